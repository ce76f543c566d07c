"""One pull as its `.status` records it: a typed record, parsed once per status write.

Owns: reading the agent's own memory of a pull back from `.status` (what the runner wrote
before, possibly in an earlier life of the agent), so that the runner asks typed questions
("was a job started?", "which images does a completion release?") instead of digging in the
Kubernetes status dict, with one definition of each.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blockpull.agent import status as st

_UID_JOB = re.compile(r"^blockpull-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def job_id_for(uid: str) -> str:
    """The job id of an object: derived from its uid, so unique per object and found again
    after an agent restart."""
    return f"blockpull-{uid}"


def uid_of_job(job_id: str) -> str | None:
    """The object uid a job id of this agent's was derived from (`job_id_for`), if it is one."""
    match = _UID_JOB.match(job_id)
    return match[1] if match else None


@dataclass(frozen=True)
class ChainEntry:
    node: str
    file: str


@dataclass(frozen=True)
class PullRecord:
    job_id: str | None
    phase: str | None
    reason: str | None
    message: str | None
    observed_generation: int | None
    #: What the job streams into and the kept base, in the driver's naming (`status.target`).
    device: str | None
    base_node: str | None
    #: The disk's chain when the job started, active image first (`status.chain`).
    chain: tuple[ChainEntry, ...]
    start_time: datetime.datetime | None
    length: int
    terminal: bool

    @classmethod
    def parse(cls, status: Mapping[str, Any] | None) -> PullRecord:
        status = status or {}
        target = status.get("target") or {}
        observed = status.get("observedGeneration")
        return cls(
            job_id=_str(status.get("jobId")),
            phase=_str(status.get("phase")),
            reason=_str(status.get("reason")),
            message=_str(status.get("message")),
            observed_generation=observed if isinstance(observed, int) else None,
            device=_str(target.get("node")),
            base_node=_str(target.get("base")),
            chain=tuple(
                ChainEntry(str(entry.get("node", "")), str(entry.get("file", "")))
                for entry in status.get("chain") or []
            ),
            start_time=st.parse_time(status.get("startTime")),
            length=int(status.get("length") or 0),
            terminal=st.is_terminal(status),
        )

    @property
    def started(self) -> bool:
        """A job was started for this object (by this agent or an earlier life of it)."""
        return self.start_time is not None or self.phase in (st.RUNNING, st.PAUSED)

    def released(self) -> list[str]:
        """The images a completed pull no longer needs: those above the base (all backing
        images without one), from the chain recorded at start."""
        released: list[str] = []
        for entry in self.chain[1:]:
            if self.base_node is not None and entry.node == self.base_node:
                break
            released.append(entry.file)
        return released


def _str(value: object) -> str | None:
    return str(value) if value else None
