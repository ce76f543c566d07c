"""The node's scheduling decisions, as pure data: who may have a job in QEMU, at what speed.

Owns: the rules of the contract's "Node scheduling", with no I/O and no clock, so that every
case is unit-testable as it is:
- `SlotQueue`: at most `limit` objects hold a slot (a slot = a job in QEMU, running or paused);
  the others wait in creation order (`QueueKey`). An object that could not start gives its
  slot back and, when it asks again, is put back where its creation time puts it: it keeps
  its place without holding a slot meanwhile.
- `max_min_shares`: a node bandwidth budget split max-min fairly over the jobs copying now.

`blockpull.agent.scheduler` wraps these for the runners (asyncio futures, notifications).
"""

from __future__ import annotations

import bisect
import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class QueueKey:
    """The order objects start in: `metadata.creationTimestamp`, then namespace/name."""

    created: datetime.datetime
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class SlotQueue:
    """Slots for jobs in QEMU, and the queue of objects waiting for one.

    Every change that can free a slot returns the uids it granted one to, in grant order.
    Nothing is granted while the queue is closed: after an agent restart the running jobs
    are re-attached (`hold`) and the waiters registered before the first grant (`open`).
    """

    def __init__(self, limit: int, *, is_open: bool = True) -> None:
        if limit < 0:
            raise ValueError(f"the slot limit must be 0 (none) or positive, got {limit}")
        self.limit = limit
        self.is_open = is_open
        self._holders: set[str] = set()
        self._waiting: list[tuple[QueueKey, str]] = []  # sorted: the queue, head first
        self._keys: dict[str, QueueKey] = {}  # uid -> its key, for waiters

    # --- questions --------------------------------------------------------------------------

    def holds(self, uid: str) -> bool:
        return uid in self._holders

    def waits(self, uid: str) -> bool:
        return uid in self._keys

    def ahead_of(self, uid: str) -> int:
        """How many waiters start before `uid` (0 when it is not waiting)."""
        key = self._keys.get(uid)
        if key is None:
            return 0
        return bisect.bisect_left(self._waiting, (key, uid))

    @property
    def holders(self) -> int:
        return len(self._holders)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # --- changes ----------------------------------------------------------------------------

    def request(self, uid: str, key: QueueKey) -> list[str]:
        """`uid` wants a slot: it holds one already, or joins the queue at its place. Returns
        the uids granted a slot by this (possibly `uid` itself)."""
        if uid in self._holders or uid in self._keys:
            return []
        self._keys[uid] = key
        bisect.insort(self._waiting, (key, uid))
        return self._grant()

    def hold(self, uid: str) -> None:
        """`uid` has a job in QEMU already (re-attached after a restart): it holds a slot,
        even beyond the limit (a lowered limit stops new starts, never a running job)."""
        self._unqueue(uid)
        self._holders.add(uid)

    def release(self, uid: str) -> list[str]:
        """`uid` no longer has a job (ended, or could not start) and no longer waits; returns
        the uids its slot went to."""
        self._unqueue(uid)
        self._holders.discard(uid)
        return self._grant()

    def open(self) -> list[str]:
        """The queue is complete: grant what the limit allows, head first."""
        self.is_open = True
        return self._grant()

    def _unqueue(self, uid: str) -> None:
        key = self._keys.pop(uid, None)
        if key is not None:
            index = bisect.bisect_left(self._waiting, (key, uid))
            del self._waiting[index]

    def _grant(self) -> list[str]:
        granted: list[str] = []
        while self.is_open and self._waiting and (self.limit == 0 or len(self._holders) < self.limit):
            _, uid = self._waiting.pop(0)
            del self._keys[uid]
            self._holders.add(uid)
            granted.append(uid)
        return granted


def max_min_shares(budget: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Split `budget` bytes/s over the jobs in `caps` max-min fairly.

    `caps` holds each job's own limit (`spec.bandwidth`, 0 = none). A job whose own limit is
    below the equal split keeps its limit; what it leaves is split equally among the others,
    repeatedly (water-filling). With no budget (0) every job runs at its own limit. A share is
    never 0, which QEMU would read as "unlimited": the least is 1 byte/s.
    """
    if budget <= 0:
        return dict(caps)
    shares: dict[str, int] = {}
    remaining = budget
    # Capped jobs in ascending order of cap, then the uncapped ones; uid breaks ties so that
    # the split is deterministic.
    order = sorted(caps, key=lambda uid: (caps[uid] == 0, caps[uid], uid))
    for position, uid in enumerate(order):
        left = len(order) - position
        fair = remaining // left
        cap = caps[uid]
        if cap != 0 and cap <= fair:
            shares[uid] = cap
            remaining -= cap
            continue
        # Every job from here on gets the equal split of what is left (their caps are above it);
        # the bytes that do not divide go one each to the first of them.
        extra = remaining - fair * left
        for index, rest in enumerate(order[position:]):
            shares[rest] = max(1, fair + (1 if index < extra else 0))
        break
    return shares


def shares_changed(before: Mapping[str, int], after: Mapping[str, int], jobs: Iterable[str]) -> list[str]:
    """The jobs whose share differs between two splits."""
    return [uid for uid in jobs if before.get(uid) != after.get(uid)]
