"""What wakes a runner: an abort (its object was deleted), a change (a spec edit, a new
bandwidth share), its deadline, or what it waits for.

Owns: the runner's two signals and every wait it makes, so that each wait is bounded by the
object's `activeDeadlineSeconds` and ends at once on an abort, and the one clock the deadline
is measured on.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from typing import Any

from blockpull.agent.clock import WallClock, utc_now


class Wakeups:
    def __init__(
        self,
        *,
        deadline: Callable[[], int | None],
        since: Callable[[], datetime.datetime],
        clock: WallClock = utc_now,
    ) -> None:
        #: `activeDeadlineSeconds` now (it may be edited) and what it counts from (the job's
        #: start, or the object's creation while no job was started: queued time counts).
        self._deadline = deadline
        self._since = since
        self._clock = clock
        self.changed = asyncio.Event()
        self.aborted = asyncio.Event()

    def seconds_to_deadline(self) -> float | None:
        return seconds_left(self._deadline(), self._since(), self._clock())

    async def wait(self, *also: asyncio.Future[Any], timeout: float | None = None) -> bool:
        """Until an abort, a change (True), one of `also`, the deadline or `timeout` (False)."""
        deadline = self.seconds_to_deadline()
        if deadline is not None:
            # Just past the deadline, so that the woken caller sees it has passed.
            timeout = deadline + 0.05 if timeout is None else min(timeout, deadline + 0.05)
        changed = asyncio.create_task(self.changed.wait())
        aborted = asyncio.create_task(self.aborted.wait())
        try:
            done, _ = await asyncio.wait(
                {changed, aborted, *also}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            # Also when the runner itself is cancelled (agent shutdown): a leaked wait task
            # makes kopf wait for "hung tasks" before the process can exit.
            changed.cancel()
            aborted.cancel()
        return changed in done

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake for an abort, a change or the deadline (the change is consumed)."""
        await self.wait(timeout=seconds)
        self.changed.clear()


def seconds_left(
    deadline: int | None, since: datetime.datetime, now: datetime.datetime | None = None
) -> float | None:
    """Seconds until `deadline` seconds after `since` (never below 0); None: no deadline."""
    if deadline is None:
        return None
    elapsed = ((now or utc_now()) - since).total_seconds()
    return max(0.0, deadline - elapsed)
