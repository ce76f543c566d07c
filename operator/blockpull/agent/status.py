"""The BlockPull `.status` computed from what the agent knows: pure functions, no I/O.

Owns: phases, `metav1.Condition`s (BlockPull's own `Running`/`Completed`/`Failed` and the
kstatus types `Reconciling`/`Stalled`/`Ready` that GitOps tools read; lastTransitionTime kept
while a condition's status does not change), the progress string, the terminal record, and
what a finished object's status changes to when a later spec edit is observed. Terminal means exactly one of
`Completed`/`Failed` is True, and nothing here ever changes it afterwards.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockpull.quantity import progress_text

PENDING, RUNNING, PAUSED, COMPLETED, FAILED = "Pending", "Running", "Paused", "Completed", "Failed"
TERMINAL_PHASES = (COMPLETED, FAILED)


def now_rfc3339(clock: datetime.datetime | None = None) -> str:
    moment = clock or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def is_terminal(status: Mapping[str, Any] | None) -> bool:
    """True once Completed or Failed is True: the outcome is recorded and final."""
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") in TERMINAL_PHASES and condition.get("status") == "True":
            return True
    return False


@dataclass(frozen=True)
class StatusView:
    """Everything the status says at one moment, before it becomes a patch."""

    phase: str
    reason: str
    message: str
    job_id: str | None = None
    target: Mapping[str, str | None] | None = None
    chain: Sequence[Mapping[str, str]] | None = None
    offset: int | None = None
    length: int | None = None
    bandwidth: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    released_images: Sequence[str] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def build_status(
    previous: Mapping[str, Any] | None, view: StatusView, *, generation: int, now: str, node_name: str
) -> dict[str, Any]:
    """The full `.status` for `view`, carrying over what `previous` knew and `view` does not."""
    previous = previous or {}
    status: dict[str, Any] = {
        key: previous[key]
        for key in ("jobId", "target", "chain", "offset", "length", "progress", "bandwidth", "startTime")
        if key in previous
    }
    status.update(phase=view.phase, reason=view.reason, message=view.message)
    status["observedGeneration"] = generation
    status["nodeName"] = node_name
    if view.job_id is not None:
        status["jobId"] = view.job_id
    if view.target is not None:
        status["target"] = {k: v for k, v in view.target.items() if v is not None}
    if view.chain is not None:
        status["chain"] = list(view.chain)
    if view.offset is not None and view.length is not None:
        status["offset"] = view.offset
        status["length"] = view.length
        status["progress"] = progress_text(view.offset, view.length)
    if view.bandwidth is not None:
        status["bandwidth"] = view.bandwidth
    if view.start_time is not None:
        status["startTime"] = view.start_time
    if view.completion_time is not None:
        status["completionTime"] = view.completion_time
    if view.released_images is not None:
        status["releasedImages"] = list(view.released_images)
    status.update(view.extra)
    status["conditions"] = _conditions(previous.get("conditions") or [], view, generation, now)
    return status


def _conditions(
    previous: Sequence[Mapping[str, Any]], view: StatusView, generation: int, now: str
) -> list[dict[str, Any]]:
    by_type = {str(c.get("type")): c for c in previous}
    result: list[dict[str, Any]] = []
    for kind, truth, reason, message in wanted_conditions(view):
        status = "True" if truth else "False"
        before = by_type.get(kind)
        moved = before is None or before.get("status") != status
        result.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now
                if moved or before is None
                else before.get("lastTransitionTime", now),
                "observedGeneration": generation,
            }
        )
    return result


def wanted_conditions(view: StatusView) -> list[tuple[str, bool, str, str]]:
    """(type, is True, reason, message) of all six conditions, in the order they are written.

    `Running`, `Completed`, `Failed` are BlockPull's own. `Reconciling`, `Stalled`, `Ready` are
    the types kstatus (Flux `wait`/health checks, `kpt live status`) understands: an object
    with none of them reads as Current (done) to it, even while pending or after a failure.
    """
    running = view.phase in (RUNNING, PAUSED)
    unfinished = view.phase not in TERMINAL_PHASES
    wanted: list[tuple[str, bool, str, str]] = [
        ("Running", running, view.reason if unfinished else _ended(view), view.message)
    ]
    # All types are always present (kubectl and GitOps health checks read a False as
    # "not yet", a missing condition as "unknown"); a False one carries the phase as its reason.
    for kind, phase in (("Completed", COMPLETED), ("Failed", FAILED)):
        wanted.append(_true_or_phase(kind, view.phase == phase, view))
    # kstatus reads conditions in list order (Reconciling=True -> InProgress, Stalled=True ->
    # Failed, then Ready): at most one of the three is True, so the order cannot matter.
    wanted.append(_true_or_phase("Reconciling", unfinished, view))
    wanted.append(_true_or_phase("Stalled", view.phase == FAILED, view))
    wanted.append(_true_or_phase("Ready", view.phase == COMPLETED, view))
    return wanted


def _true_or_phase(kind: str, truth: bool, view: StatusView) -> tuple[str, bool, str, str]:
    if truth:
        return (kind, True, view.reason, view.message)
    return (kind, False, view.phase, f"phase is {view.phase}")


def _ended(view: StatusView) -> str:
    return "JobEnded" if view.phase in TERMINAL_PHASES else view.reason


def observe_generation(status: Mapping[str, Any], generation: int) -> dict[str, Any] | None:
    """The fields a FINISHED object's status must change to show `generation` was observed.

    A spec edit after the outcome (a new `bandwidth` or `ttlSecondsAfterFinished` re-applied
    from Git) changes nothing in QEMU, but without a new `observedGeneration` kstatus reads
    the object as InProgress for good. The outcome, its reason, message and times stay as
    they are; a status written before the GitOps conditions existed gets them, dated at the
    outcome's `completionTime` (when they became what they say). None: nothing to change.
    """
    if not is_terminal(status):
        return None
    conditions = [dict(c) for c in status.get("conditions") or []]
    present = {str(c.get("type")) for c in conditions}
    phase = COMPLETED if _true(conditions, COMPLETED) else FAILED
    outcome = next((c for c in conditions if c.get("type") == phase), {})
    view = StatusView(
        phase=phase,
        reason=str(status.get("reason") or outcome.get("reason") or phase),
        message=str(status.get("message") or outcome.get("message") or ""),
    )
    when = str(status.get("completionTime") or outcome.get("lastTransitionTime") or now_rfc3339())
    missing = [w for w in wanted_conditions(view) if w[0] not in present]
    behind = status.get("observedGeneration") != generation or any(
        c.get("observedGeneration") != generation for c in conditions
    )
    if not missing and not behind:
        return None
    for condition in conditions:
        condition["observedGeneration"] = generation
    for kind, truth, reason, message in missing:
        conditions.append(
            {
                "type": kind,
                "status": "True" if truth else "False",
                "reason": reason,
                "message": message,
                "lastTransitionTime": when,
                "observedGeneration": generation,
            }
        )
    return {"observedGeneration": generation, "conditions": conditions}


def _true(conditions: Sequence[Mapping[str, Any]], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)
