"""kstatus's `Compute`, ported to Python for the tests: how Flux and kpt read a BlockPull.

Ported from kubernetes-sigs/cli-utils, `pkg/kstatus/status/status.go` (`Compute`,
`checkReadyCondition`) and `pkg/kstatus/status/generic.go` (`checkGenericProperties`,
`checkGeneration`) at commit 5895ad6c17dd06b99c1e5c8af17e2b12a3504fad (2025-10-21). That
library is what Flux's kustomize-controller (`wait: true`, `healthChecks`) and
`kpt live status` compute an object's status with. Only the paths a custom kind takes are
ported: `GetLegacyConditionsFn` (built-in kinds such as Deployment or Job) returns nothing
for `blockpull.dev/BlockPull`. Messages are kstatus's own. Like kstatus, this ignores each
condition's `observedGeneration` and `lastTransitionTime`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IN_PROGRESS, FAILED, CURRENT, TERMINATING = "InProgress", "Failed", "Current", "Terminating"


@dataclass(frozen=True)
class Result:
    status: str
    message: str


def compute(obj: Mapping[str, Any]) -> Result:
    """`status.Compute(u)` for a custom resource."""
    generic = _check_generic_properties(obj)
    if generic is not None:
        return generic
    # GetLegacyConditionsFn(u) is nil for a custom kind; then checkReadyCondition.
    ready = _check_ready_condition(obj)
    if ready is not None:
        return ready
    # "we assume that the absence of any known conditions means the resource is current"
    return Result(CURRENT, "Resource is current")


def _check_generic_properties(obj: Mapping[str, Any]) -> Result | None:
    metadata = obj.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return Result(TERMINATING, "Resource scheduled for deletion")
    generation = _check_generation(obj)
    if generation is not None:
        return generation
    for cond in _conditions(obj):
        if cond.get("type") == "Reconciling" and cond.get("status") == "True":
            return Result(IN_PROGRESS, str(cond.get("message", "")))
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return Result(FAILED, str(cond.get("message", "")))
    return None


def _check_generation(obj: Mapping[str, Any]) -> Result | None:
    metadata = obj.get("metadata") or {}
    if "generation" not in metadata:
        return None
    status = obj.get("status") or {}
    if "observedGeneration" not in status:
        return None  # "Resource does not have this field, so we can't do this check."
    generation, observed = int(metadata["generation"]), int(status["observedGeneration"])
    if observed != generation:
        kind = obj.get("kind", "")
        return Result(
            IN_PROGRESS, f"{kind} generation is {generation}, but latest observed generation is {observed}"
        )
    return None


def _check_ready_condition(obj: Mapping[str, Any]) -> Result | None:
    for cond in _conditions(obj):
        if cond.get("type") != "Ready":
            continue
        if cond.get("status") == "True":
            return Result(CURRENT, "Resource is Ready")
        if cond.get("status") in ("False", "Unknown"):
            return Result(IN_PROGRESS, str(cond.get("message", "")))
    return None


def _conditions(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((obj.get("status") or {}).get("conditions") or [])
