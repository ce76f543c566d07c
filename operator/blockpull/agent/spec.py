"""A BlockPull's spec as typed, validated values.

Owns: reading `.spec` of a BlockPull into a `PullSpec`, refusing what the CRD schema should
already have refused (a cluster without the schema, or an older CRD, must not hurt a VM).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blockpull.agent.settings import DNS1123_LABEL
from blockpull.driver import ON_ERROR_CHOICES
from blockpull.errors import InvalidSpec
from blockpull.quantity import parse_bandwidth


@dataclass(frozen=True)
class PullSpec:
    node_name: str
    vm: str
    disk: str
    base: str | None = None
    bandwidth: int = 0
    paused: bool = False
    on_error: str = "report"
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> PullSpec:
        vm = _required_str(spec, "vm")
        if not DNS1123_LABEL.match(vm):
            raise InvalidSpec(f"spec.vm {vm!r} is not a DNS-1123 label")
        disk = _required_str(spec, "disk")
        base = spec.get("base")
        if base is not None and (not isinstance(base, str) or not base):
            raise InvalidSpec("spec.base must be a non-empty string: an image path or a node name")
        for what, value in (("disk", disk), ("base", base)):
            if value is not None and value.startswith("/") and os.path.normpath(value) != value:
                raise InvalidSpec(f"spec.{what} {value!r} must be a normalized absolute path")
        on_error = spec.get("onError", "report")
        if on_error not in ON_ERROR_CHOICES:
            raise InvalidSpec(f"spec.onError must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        paused = spec.get("paused", False)
        if not isinstance(paused, bool):
            raise InvalidSpec(f"spec.paused must be true or false, got {paused!r}")
        return cls(
            node_name=_required_str(spec, "nodeName"),
            vm=vm,
            disk=disk,
            base=base,
            bandwidth=parse_bandwidth(spec.get("bandwidth")),
            paused=paused,
            on_error=str(on_error),
            active_deadline_seconds=_optional_int(spec, "activeDeadlineSeconds", minimum=1),
            ttl_seconds_after_finished=_optional_int(spec, "ttlSecondsAfterFinished", minimum=0),
        )


def _required_str(spec: Mapping[str, Any], key: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidSpec(f"spec.{key} is required and must be a non-empty string")
    return value


def _optional_int(spec: Mapping[str, Any], key: str, *, minimum: int) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidSpec(f"spec.{key} must be an integer >= {minimum}, got {value!r}")
    return value
