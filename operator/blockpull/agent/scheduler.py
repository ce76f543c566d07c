"""The node scheduler: hands slots and bandwidth shares to runners.

Owns: the asyncio side of `blockpull.agent.scheduling` for one agent. A runner asks for a
slot before it starts a job and waits on a future (no QMP traffic while it waits); it tells
the scheduler when its job copies or stops copying and applies the share it is given; it is
told (a callback) when its share changes because another job started, ended, paused or
resumed, or changed its own `spec.bandwidth`. Runners never decide slots or shares themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from blockpull.agent.scheduling import QueueKey, SlotQueue, max_min_shares, shares_changed

log = logging.getLogger(__name__)


class NodeScheduler:
    def __init__(self, *, limit: int, budget: int) -> None:
        self.limit = limit
        self.budget = budget
        # With a limit, nothing is granted before the agent has seen all of its objects (`open`):
        # a restarted agent would otherwise start the first object it happens to see.
        self._queue = SlotQueue(limit, is_open=limit == 0)
        #: Set once slots are granted (at once without a limit; after the rebuild with one).
        self.opened = asyncio.Event()
        if self._queue.is_open:
            self.opened.set()
        self._grants: dict[str, asyncio.Future[None]] = {}
        self._caps: dict[str, int] = {}  # jobs copying now: their own spec.bandwidth
        self._shares: dict[str, int] = {}
        self._on_share: dict[str, Callable[[], None]] = {}

    # --- slots ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._queue.is_open

    def request(self, uid: str, key: QueueKey) -> asyncio.Future[None]:
        """A future that is done once `uid` holds a slot (done at once when it can start now).
        Asking again while waiting returns the same future: the object keeps its place."""
        grant = self._grants.get(uid)
        if grant is None or grant.cancelled():
            grant = asyncio.get_running_loop().create_future()
            self._grants[uid] = grant
        if self._queue.holds(uid):
            _done(grant)
        else:
            self._granted(self._queue.request(uid, key))
        return grant

    def ahead_of(self, uid: str) -> int:
        """How many waiting objects start before `uid`."""
        return self._queue.ahead_of(uid)

    def expect(self, keyed: Iterable[tuple[str, QueueKey]], running: Iterable[str]) -> None:
        """The agent's full list after a restart: `running` objects have a job in QEMU (they
        hold their slots, re-attached first), `keyed` ones wait for one, in their order."""
        for uid in running:
            self._queue.hold(uid)
        for uid, key in keyed:
            self._queue.request(uid, key)

    def hold(self, uid: str) -> None:
        """`uid` has a job in QEMU (a re-attach): it holds a slot, whatever the limit."""
        self._queue.hold(uid)

    def open(self) -> None:
        self._granted(self._queue.open())
        self.opened.set()

    def close(self) -> None:
        """Grant nothing more (the agent is shutting down: a freed slot must not start a job)."""
        self._queue.is_open = False

    def release(self, uid: str) -> None:
        """`uid` has no job in QEMU any more (ended, or could not start) and does not wait:
        its slot and its bandwidth share go to others."""
        grant = self._grants.pop(uid, None)
        if grant is not None and not grant.done():
            grant.cancel()
        held = self._queue.holds(uid)
        self._granted(self._queue.release(uid))
        if held:
            log.debug(
                "slot of %s released (%d held, %d waiting)", uid, self._queue.holders, self._queue.waiting
            )
        self.stopped_copying(uid)

    def _granted(self, uids: list[str]) -> None:
        for uid in uids:
            grant = self._grants.get(uid)
            if grant is not None:
                _done(grant)
            # Else: an object from the restart's list whose runner is not there yet; it finds
            # its slot held when it asks.

    @property
    def holders(self) -> int:
        return self._queue.holders

    @property
    def waiting(self) -> int:
        return self._queue.waiting

    # --- bandwidth --------------------------------------------------------------------------

    def copying(self, uid: str, own_limit: int, on_change: Callable[[], None]) -> int:
        """`uid`'s job copies (started, resumed, or its spec.bandwidth changed): its share of
        the budget (its own limit when there is no budget). `on_change` is called when the
        share changes because of another job."""
        self._on_share[uid] = on_change
        self._caps[uid] = own_limit
        self._rebalance(uid)
        return self._shares[uid]

    def stopped_copying(self, uid: str) -> None:
        """`uid`'s job is paused or gone: its share goes to the others."""
        self._on_share.pop(uid, None)
        if self._caps.pop(uid, None) is not None:
            self._rebalance(uid)

    def share(self, uid: str) -> int | None:
        return self._shares.get(uid)

    def _rebalance(self, changed_by: str) -> None:
        shares = max_min_shares(self.budget, self._caps)
        moved = shares_changed(self._shares, shares, shares)
        self._shares = shares
        for uid in moved:
            listener = self._on_share.get(uid)
            if uid != changed_by and listener is not None:
                listener()


def _done(grant: asyncio.Future[None]) -> None:
    if not grant.done():
        grant.set_result(None)
