"""The BlockPull `.status` computed from what the agent knows: pure functions, no I/O.

Owns: phases, `metav1.Condition`s (with lastTransitionTime kept while a condition's status
does not change), the progress string, and the terminal record. Terminal means exactly one of
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
    running = view.phase in (RUNNING, PAUSED)
    wanted: list[tuple[str, bool, str, str]] = [
        ("Running", running, view.reason if running or view.phase == PENDING else _ended(view), view.message)
    ]
    # All three types are always present (kubectl and GitOps health checks read a False as
    # "not yet", a missing condition as "unknown"); a False one carries the phase as its reason.
    for kind, phase in (("Completed", COMPLETED), ("Failed", FAILED)):
        if view.phase == phase:
            wanted.append((kind, True, view.reason, view.message))
        else:
            wanted.append((kind, False, view.phase, f"phase is {view.phase}"))
    by_type = {str(c.get("type")): c for c in previous}
    result: list[dict[str, Any]] = []
    for kind, truth, reason, message in wanted:
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


def _ended(view: StatusView) -> str:
    return "JobEnded" if view.phase in TERMINAL_PHASES else view.reason
