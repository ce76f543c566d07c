"""Following a running job: progress into the status, live steering, its end.

Owns: one job from its (re)attach to its end: progress read from the driver and written as
the status allows (`blockpull.agent.reporter` throttles it), spec edits and bandwidth shares
applied through `Steering`, and the three ways the wait ends (the job's own end, a deletion,
the deadline), each handed to `JobEnding`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from blockpull import pull as protocol
from blockpull.agent import status as st
from blockpull.agent import views
from blockpull.agent.ending import JobEnding
from blockpull.agent.metrics import AgentMetrics
from blockpull.agent.reporter import Reporter
from blockpull.agent.steering import Steering
from blockpull.agent.wakeups import Wakeups
from blockpull.driver import BlockJobDriver, Progress
from blockpull.errors import BlockPullError, DeadlineExceeded, JobNotFound

if TYPE_CHECKING:
    from blockpull.agent.runner import ObjectState


class JobFollower:
    def __init__(
        self,
        state: ObjectState,
        job_id: str,
        poll_interval: float,
        reporter: Reporter,
        metrics: AgentMetrics,
        *,
        steering: Steering,
        ending: JobEnding,
        wakeups: Wakeups,
        rejected: Callable[[], views.Rejected],
    ) -> None:
        self._state = state
        self._job_id = job_id
        self._poll_interval = poll_interval
        self._reporter = reporter
        self._metrics = metrics
        self._steering = steering
        self._ending = ending
        self._wakeups = wakeups
        #: The newest spec generation the runner could not apply, and why.
        self._rejected = rejected

    async def follow(self, driver: BlockJobDriver) -> None:
        """Follow the job to its end and see that end through (a vanished job included)."""
        try:
            await self._follow_job(driver)
        except JobNotFound:
            await self._ending.vanished(driver)

    async def _follow_job(self, driver: BlockJobDriver) -> None:
        """Follow the job to its end, applying spec changes, deadline and abort on the way."""
        await self._steer(driver, initial=True)
        waiter = asyncio.create_task(
            protocol.follow(
                driver, self._job_id, on_progress=self._on_progress, poll_interval=self._poll_interval
            )
        )
        try:
            while True:
                woke = await self._wakeups.wait(waiter)
                if waiter.done():
                    waiter.result()  # a vanished job (JobNotFound) or a lost VM propagates
                    await self._ending.finish(driver)
                    return
                if self._wakeups.aborted.is_set():
                    await self._ending.cancel(driver, reason=None)
                    return
                if woke:
                    self._wakeups.changed.clear()
                    await self._steer(driver, initial=False)
                elif self._wakeups.seconds_to_deadline() == 0:
                    await self._ending.cancel(driver, reason=DeadlineExceeded.reason)
                    return
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError, BlockPullError):
                    await waiter

    async def _steer(self, driver: BlockJobDriver, *, initial: bool) -> None:
        spec = self._state.spec
        job = await self._job(driver)
        if job.ended:
            return
        await self._steering.apply(
            driver, job, own_bandwidth=spec.bandwidth, paused=spec.paused, initial=initial
        )
        job = await self._job(driver)
        if initial:
            # Right after the Running write: only a phase change (e.g. re-attached to a paused
            # job) is worth a write now; progress waits its turn.
            await self._on_progress(job)
        else:
            # A spec edit or a new share: show its effect (bandwidth, phase, observedGeneration) at once.
            await self._reporter.transition(self._running_view(job))

    async def _job(self, driver: BlockJobDriver) -> Progress:
        job = await driver.find_job(self._job_id)
        if job is None:
            raise JobNotFound(f"QEMU has no block job {self._job_id!r}")
        return job

    async def _on_progress(self, job: Progress) -> None:
        self._metrics.progress(self._state.ref, job.offset, job.length)
        view = self._running_view(job)
        if view.phase != self._reporter.status.get("phase"):
            await self._reporter.transition(view)
        else:
            await self._reporter.progress(view)

    def _running_view(self, job: Progress) -> st.StatusView:
        return views.running(
            self._job_id,
            job,
            self._state.spec.on_error,
            self._rejected(),
            pause_unsupported=self._steering.pause_unsupported,
        )
