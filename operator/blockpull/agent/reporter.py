"""Writing one object's status and Events: throttled progress, immediate transitions.

Owns: the object's current `.status` as the agent last wrote it, the rule "at most one progress
write per interval, every transition at once", retries of status writes, and the guard that a
terminal status is never overwritten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from blockpull.agent import status as st
from blockpull.agent.clock import WallClock, utc_now
from blockpull.agent.kube import Gone, KubeAPI, KubeAPIError, ObjectRef, QueuedWrite

log = logging.getLogger(__name__)
_WRITE_ATTEMPTS = 6


class Reporter(Protocol):
    """Where the runner's view of the object goes (the status subresource and Events)."""

    async def transition(self, view: st.StatusView) -> None: ...
    def transition_soon(self, view: st.StatusView) -> None: ...
    async def progress(self, view: st.StatusView) -> None: ...
    async def event(self, kind: str, reason: str, message: str) -> None: ...
    @property
    def status(self) -> Mapping[str, Any]: ...


class ObjectReporter:
    """The `Reporter` of one object, writing through the agent's `KubeAPI`."""

    def __init__(
        self,
        kube: KubeAPI,
        ref: ObjectRef,
        *,
        node_name: str,
        interval: float,
        status: Mapping[str, Any] | None,
        generation: Callable[[], int],
        clock: Callable[[], float] | None = None,
        now: WallClock = utc_now,
    ) -> None:
        self._kube = kube
        self._ref = ref
        self._node_name = node_name
        self._interval = interval
        self._status: dict[str, Any] = dict(status or {})
        self._generation = generation
        #: The throttle's clock: the event loop's unless told (controlled time in tests).
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        #: Condition timestamps.
        self._now = now
        self._last_write = float("-inf")
        #: A write started by `transition_soon`; the next write withdraws it if it has not
        #: left the agent yet, or else waits for it (order kept).
        self._in_flight: asyncio.Task[None] | None = None
        self._in_flight_queued: QueuedWrite | None = None
        self._withdrawn: asyncio.Task[None] | None = None

    @property
    def status(self) -> Mapping[str, Any]:
        return self._status

    async def transition(self, view: st.StatusView) -> None:
        await self._settle()
        await self._write(view, urgent=True)

    def transition_soon(self, view: st.StatusView) -> None:
        """Start writing `view` (a first status) and return at once: the caller's work
        overlaps the write. It goes through the API's first-status lane; a later write
        supersedes it while it still waits there (in a burst of new objects, the Running write
        then goes out instead of both), or else waits for it, so the writes reach the API in
        order."""
        if self._in_flight is None or self._in_flight.done():
            self._in_flight_queued = QueuedWrite()
            self._in_flight = asyncio.ensure_future(
                self._write(view, urgent=False, queued=self._in_flight_queued)
            )

    async def progress(self, view: st.StatusView) -> None:
        await self._settle()
        if self._clock() - self._last_write < self._interval:
            return  # the next poll after the interval carries fresher numbers anyway
        await self._write(view, urgent=False)

    async def _settle(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        queued, self._in_flight_queued = self._in_flight_queued, None
        if in_flight is None:
            return
        if queued is not None and queued.withdraw():
            # Never sent; the write that follows carries the whole status. The task ends on its
            # own once a worker reaches it (kept referenced until then).
            self._withdrawn = in_flight
            return
        try:
            await in_flight
        except KubeAPIError as exc:  # the next write carries the whole status again
            log.warning("%s: an earlier status write failed: %s", self._ref, exc)

    async def event(self, kind: str, reason: str, message: str) -> None:
        await self._kube.post_event(self._ref, kind, reason, message)

    async def _write(self, view: st.StatusView, *, urgent: bool, queued: QueuedWrite | None = None) -> None:
        if st.is_terminal(self._status):
            log.warning("%s: not overwriting the recorded outcome with phase %s", self._ref, view.phase)
            return
        new = st.build_status(
            self._status,
            view,
            generation=self._generation(),
            now=st.now_rfc3339(self._now()),
            node_name=self._node_name,
        )
        delay = 0.2
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                patch = _with_removals(self._status, new)
                if not await self._kube.patch_status(self._ref, patch, urgent=urgent, queued=queued):
                    return  # withdrawn: a newer write supersedes it
                break
            except Gone:
                raise
            except KubeAPIError as exc:
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
                log.warning("%s: status write failed (%s); retrying in %.1fs", self._ref, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if new.get("phase") != self._status.get("phase") or new.get("reason") != self._status.get("reason"):
            # One line per transition: what an admin greps the agent's log for.
            log.info("%s: %s/%s: %s", self._ref, new.get("phase"), new.get("reason"), new.get("message", ""))
        self._status = new
        self._last_write = self._clock()


def _with_removals(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    # A JSON merge patch keeps keys it does not mention; null removes them.
    patch: dict[str, Any] = dict(new)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
