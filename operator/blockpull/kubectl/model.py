"""What a BlockPull's status means to the plugin, and the set of objects it follows: pure.

Owns: reading one object (`Pull.of`: phase, reason, progress, outcome), the outcome rule (the
`Completed`/`Failed` conditions, which never change once True; the phase as a fallback for a
status written without conditions), and `Followed`: the objects a command follows, updated
from list snapshots and watch events, with a rate meter each for the rate and ETA.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from blockpull.cli_render import RateMeter
from blockpull.quantity import progress_text

#: Rate over a longer window than the node CLI's 5 s: the agent writes progress every 2 s.
RATE_WINDOW = 10.0


class Outcome(enum.StrEnum):
    COMPLETED = "Completed"
    FAILED = "Failed"
    #: Deleted before the agent recorded an outcome (aborted): not a completion.
    DELETED = "Deleted"


Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Pull:
    """One BlockPull as last seen."""

    namespace: str
    name: str
    uid: str
    phase: str  # "" while the agent has written no status yet
    reason: str
    message: str
    offset: int | None
    length: int | None
    progress: str  # the agent's text ("45.12%"), else computed by the same rule, else ""
    node: str
    deleting: bool
    outcome: Outcome | None
    raw: Mapping[str, Any]

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def fraction(self) -> float | None:
        """offset/length in 0..1 for a bar, or None when QEMU reported nothing yet."""
        if self.outcome is Outcome.COMPLETED:
            return 1.0
        if self.offset is None or not self.length:
            return None
        return max(0.0, min(1.0, self.offset / self.length))

    @property
    def remaining(self) -> int | None:
        if self.offset is None or self.length is None:
            return None
        return max(0, self.length - self.offset)

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Pull:
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        spec = obj.get("spec") or {}
        offset, length = _int(status.get("offset")), _int(status.get("length"))
        progress = str(status.get("progress") or "")
        if not progress and offset is not None and length is not None:
            progress = progress_text(offset, length)
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            phase=str(status.get("phase") or ""),
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
            offset=offset,
            length=length,
            progress=progress,
            node=str(spec.get("nodeName") or ""),
            deleting=bool(meta.get("deletionTimestamp")),
            outcome=outcome_of(status),
            raw=obj,
        )


def outcome_of(status: Mapping[str, Any]) -> Outcome | None:
    """Completed or Failed once the agent recorded it; None while the pull may still go on."""
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Completed":
            return Outcome.COMPLETED
        if condition.get("type") == "Failed":
            return Outcome.FAILED
    phase = status.get("phase")
    if phase in ("Completed", "Failed"):
        return Outcome(phase)
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class Tracked:
    """A followed object: its latest state, whether it is gone, and its offset's speed."""

    pull: Pull
    gone: bool = False
    meter: RateMeter = field(default_factory=lambda: RateMeter(window=RATE_WINDOW))

    @property
    def outcome(self) -> Outcome | None:
        if self.pull.outcome is not None:
            return self.pull.outcome
        return Outcome.DELETED if self.gone else None

    def observe(self, pull: Pull, now: float) -> bool:
        """Take a newer state; True if anything a person sees changed."""
        changed = (pull.phase, pull.reason, pull.progress, pull.outcome, pull.deleting) != (
            self.pull.phase,
            self.pull.reason,
            self.pull.progress,
            self.pull.outcome,
            self.pull.deleting,
        )
        if pull.uid != self.pull.uid:  # deleted and re-created under the same name
            self.meter = RateMeter(window=RATE_WINDOW)
            self.gone = False
            changed = True
        self.pull = pull
        if pull.offset is not None and pull.phase == "Running":
            self.meter.add(now, pull.offset)
        return changed

    def rate(self) -> float | None:
        return self.meter.rate() if self.pull.phase == "Running" else None

    def eta(self) -> float | None:
        remaining = self.pull.remaining
        if remaining is None or self.pull.phase != "Running":
            return None
        return self.meter.eta(remaining)


class Followed:
    """The objects a command follows: named ones, or all the watch delivers (selector, -A).

    With names, only those are followed (and a name missing from the first listing is an
    error the caller reports); without, every object listed or added is.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = tuple(dict.fromkeys(names))
        self.objects: dict[Key, Tracked] = {}
        self.synced = False

    def wants(self, pull: Pull) -> bool:
        return not self.names or pull.name in self.names

    def snapshot(self, items: Iterable[Mapping[str, Any]], now: float) -> set[Key]:
        """A full listing (first, or after 410 Gone): objects absent from it are gone."""
        seen: set[Key] = set()
        changed: set[Key] = set()
        for obj in items:
            pull = Pull.of(obj)
            if not self.wants(pull):
                continue
            seen.add(pull.key)
            if self._observe(pull, now):
                changed.add(pull.key)
        for key, tracked in self.objects.items():
            if key not in seen and not tracked.gone:
                tracked.gone = True
                changed.add(key)
        self.synced = True
        return changed

    def event(self, kind: str, obj: Mapping[str, Any], now: float) -> Key | None:
        """One watch event; the key of the object if a person would see a change."""
        pull = Pull.of(obj)
        if not self.wants(pull):
            return None
        if kind == "DELETED":
            tracked = self.objects.get(pull.key)
            if tracked is None:
                self.objects[pull.key] = Tracked(pull, gone=True)
                return pull.key
            if tracked.pull.uid != pull.uid:
                return None  # the DELETED of an older object of that name, already replaced
            tracked.observe(pull, now)
            tracked.gone = True
            return pull.key
        return pull.key if self._observe(pull, now) else None

    def _observe(self, pull: Pull, now: float) -> bool:
        tracked = self.objects.get(pull.key)
        if tracked is None:
            tracked = self.objects[pull.key] = Tracked(pull)
            if pull.offset is not None and pull.phase == "Running":
                tracked.meter.add(now, pull.offset)
            return True
        return tracked.observe(pull, now)

    def missing(self) -> list[str]:
        """Named objects the listing did not have."""
        present = {name for (_, name) in self.objects}
        return [name for name in self.names if name not in present]

    def ordered(self) -> list[Tracked]:
        """Named objects in the order given; others by namespace, then name."""
        if self.names:
            rank = {name: index for index, name in enumerate(self.names)}
            return sorted(self.objects.values(), key=lambda t: (rank.get(t.pull.name, 0), t.pull.namespace))
        return [self.objects[key] for key in sorted(self.objects)]

    def all_finished(self) -> bool:
        return self.synced and all(t.outcome is not None for t in self.objects.values())

    def first_failure(self) -> Tracked | None:
        return next((t for t in self.ordered() if t.outcome not in (None, Outcome.COMPLETED)), None)

    def counts(self) -> dict[str, int]:
        """How many objects are in each phase or outcome, for a summary line."""
        out: dict[str, int] = {}
        for tracked in self.objects.values():
            label = tracked.outcome.value if tracked.outcome else (tracked.pull.phase or "New")
            out[label] = out.get(label, 0) + 1
        return out
