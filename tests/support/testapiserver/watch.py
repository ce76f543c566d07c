"""The watch hub: a bounded change history per resource and the live fan-out to open watches.

Owns which changes a watch starting at ``resourceVersion=N`` gets (the kept changes after N, or a
``410 Expired`` when N is older than the kept history), the delivery of new changes to open watches,
and the translation of a change into the event *this* watcher sees: as in a real server's watch
cache, an object that stops matching a watcher's selectors arrives as ``DELETED`` and one that
starts matching arrives as ``ADDED``.

Everything runs on the server's event loop; a change is published synchronously by the store in
the same step that commits it, so a watch that replays history and then subscribes (with no
``await`` in between) neither misses nor repeats a change.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from testapiserver.errors import expired
from testapiserver.resources import StorageKey
from testapiserver.selectors import Selection


@dataclass(frozen=True)
class Change:
    """One committed change of a stored object (never mutated after publishing)."""

    type: str  # ADDED | MODIFIED | DELETED
    rv: int
    key: StorageKey
    obj: dict[str, Any]  # the stored object after the change (for DELETED: its last state)
    old: dict[str, Any] | None  # the stored object before the change (None for ADDED)


def event_for(change: Change, selection: Selection) -> tuple[str, dict[str, Any]] | None:
    """The event type this watcher sees for a change, or None if it sees nothing."""
    new_match = selection.matches(change.obj)
    old_match = change.old is not None and selection.matches(change.old)
    if change.type == "ADDED":
        return ("ADDED", change.obj) if new_match else None
    if change.type == "DELETED":
        return ("DELETED", change.obj) if new_match or old_match else None
    if new_match and old_match:
        return ("MODIFIED", change.obj)
    if new_match:
        return ("ADDED", change.obj)
    if old_match:
        return ("DELETED", change.obj)
    return None


@dataclass(eq=False)
class Subscription:
    """One open watch: its queue of changes; ``None`` in the queue means "close the stream"."""

    key: StorageKey
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


class WatchHub:
    def __init__(self, history_size: int = 1000) -> None:
        self.history_size = history_size
        self._history: dict[StorageKey, deque[Change]] = {}
        # Watching from an rv below a floor is 410: the changes after it are no longer kept.
        self._floors: dict[StorageKey, int] = {}
        self._global_floor = 0
        self._subs: set[Subscription] = set()

    @property
    def open_watches(self) -> int:
        return len(self._subs)

    def publish(self, change: Change) -> None:
        history = self._history.setdefault(change.key, deque())
        history.append(change)
        while len(history) > self.history_size:
            dropped = history.popleft()
            self._floors[change.key] = dropped.rv
        for sub in list(self._subs):
            if sub.key == change.key and not sub.closed:
                sub.queue.put_nowait(change)

    def since(self, key: StorageKey, rv: int, current_rv: int) -> list[Change]:
        """Kept changes with rv > ``rv``; 410 if some changes after ``rv`` were forgotten."""
        floor = max(self._floors.get(key, 0), self._global_floor)
        if rv < floor:
            raise expired(f"too old resource version: {rv} ({floor})")
        return [c for c in self._history.get(key, ()) if c.rv > rv]

    def subscribe(self, key: StorageKey) -> Subscription:
        sub = Subscription(key)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        sub.closed = True

    def close_key(self, key: StorageKey) -> None:
        """Close the watches of one resource (its CRD is gone)."""
        for sub in list(self._subs):
            if sub.key == key:
                sub.close()

    def close_all(self) -> None:
        for sub in list(self._subs):
            sub.close()

    def expire(self, floor: int) -> None:
        """Forget all history below ``floor`` and close every open watch (as after compaction)."""
        self._global_floor = floor
        self._history.clear()
        self._floors.clear()
        self.close_all()
