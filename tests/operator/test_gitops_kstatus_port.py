"""The kstatus port (kstatus.py) against the rules it ports: each branch of kstatus's `Compute`
for a custom resource, with the messages kstatus gives (no QEMU needed)."""

from __future__ import annotations

from typing import Any

import kstatus
import pytest


def _obj(status: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"kind": "BlockPull", "metadata": {"name": "x", "generation": 2, **metadata}}
    if status is not None:
        obj["status"] = status
    return obj


def _cond(kind: str, status: str, message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": "R", "message": message}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        # No status, or no known condition: "the absence of any known conditions means current".
        (_obj(), ("Current", "Resource is current")),
        (_obj({"conditions": [_cond("Completed", "False")]}), ("Current", "Resource is current")),
        # Deletion first, whatever the status says.
        (_obj({"conditions": [_cond("Stalled", "True")]}, deletionTimestamp="2026-12-04T10:00:00Z"),
         ("Terminating", "Resource scheduled for deletion")),
        # observedGeneration behind wins over conditions; absent, the check is skipped.
        (_obj({"observedGeneration": 1, "conditions": [_cond("Ready", "True")]}),
         ("InProgress", "BlockPull generation is 2, but latest observed generation is 1")),
        (_obj({"conditions": [_cond("Ready", "True")]}), ("Current", "Resource is Ready")),
        # Reconciling/Stalled: the first True one in list order.
        (_obj({"conditions": [_cond("Stalled", "True", "s"), _cond("Reconciling", "True", "r")]}),
         ("Failed", "s")),
        (_obj({"conditions": [_cond("Reconciling", "True", "r"), _cond("Stalled", "True", "s")]}),
         ("InProgress", "r")),
        # Then Ready: False and Unknown read InProgress.
        (_obj({"conditions": [_cond("Ready", "False", "not yet")]}), ("InProgress", "not yet")),
        (_obj({"conditions": [_cond("Ready", "Unknown", "?")]}), ("InProgress", "?")),
        (_obj({"conditions": [_cond("Reconciling", "False"), _cond("Ready", "True")]}),
         ("Current", "Resource is Ready")),
    ],
)  # fmt: skip
def test_compute(obj: dict[str, Any], expected: tuple[str, str]) -> None:
    result = kstatus.compute(obj)
    assert (result.status, result.message) == expected
