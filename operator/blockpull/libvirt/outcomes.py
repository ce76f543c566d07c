"""How a driver learns that a libvirt job ended, and how a follower is woken.

Owns: waiting on the domain's events for a driver. The connection's event callbacks write what
happened into the domain's `DomainJobs` (a BLOCK_JOB_2 event's outcome in `concluded`, a stop
in `gone`) and wake every registered waiter; this module registers the waiters: one per
`JobEnds.conclusion` call, and one per open `watch` (the `JobWatch` a follower waits on).

libvirt drops a job from `blockJobInfo` a few ms before its end event reaches us, so a job we
saw running that libvirt no longer lists is given `EVENT_GRACE` s for its event. A job that
ended while nobody listened never gets one: its record is forgotten and the chain in libvirt's
XML tells how it ended (`BlockJobDriver.pulled`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from blockpull.driver import BlockJobDriver, Progress
from blockpull.errors import Disconnected
from blockpull.libvirt.connection import DomainJobs, LibvirtConnection

#: How long a job libvirt no longer lists may take to announce its end (measured: ~7 ms).
EVENT_GRACE = 2.0


class LibvirtJobWatch:
    """Wakes on the domain's block-job and lifecycle events and on reconnects."""

    def __init__(self, driver: BlockJobDriver, jobs: DomainJobs, event: asyncio.Event) -> None:
        self._driver = driver
        self._jobs = jobs
        self._event = event

    def _check(self) -> None:
        if self._driver.closed:
            raise Disconnected(f"the libvirt driver for {self._driver.describe} is closed")
        if self._jobs.gone:
            raise Disconnected(f"libvirt domain {self._jobs.name!r} stopped")

    async def changed(self, timeout: float) -> bool:
        self._check()
        if not self._event.is_set():
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation
                # that arrives as the wait completes (the follower would then never stop).
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                return False
        self._event.clear()
        self._check()
        return True


class JobEnds:
    """The ends of domain `jobs.name`'s jobs, as `conn`'s event callbacks record them."""

    def __init__(self, conn: LibvirtConnection, jobs: DomainJobs) -> None:
        self.conn = conn
        self._jobs = jobs

    async def conclusion(self, target: str) -> Progress | None:
        """The event-made record of `target`'s job, waiting for it at most `EVENT_GRACE` s."""
        event = asyncio.Event()
        self._jobs.waiters.add(event)
        try:
            async with asyncio.timeout(EVENT_GRACE):
                while target not in self._jobs.concluded and self.conn.connected:
                    await event.wait()
                    event.clear()
        except TimeoutError:
            pass
        finally:
            self._jobs.waiters.discard(event)
        concluded = self._jobs.concluded.get(target)
        if concluded is None:
            self._jobs.last.pop(target, None)  # ended unseen: the chain tells (`pulled`)
        return concluded

    @contextlib.asynccontextmanager
    async def watch(self, driver: BlockJobDriver) -> AsyncIterator[LibvirtJobWatch]:
        """Notifications for a follower of `driver`'s jobs while the context is open."""
        event = asyncio.Event()
        self._jobs.waiters.add(event)
        try:
            yield LibvirtJobWatch(driver, self._jobs, event)
        finally:
            self._jobs.waiters.discard(event)
