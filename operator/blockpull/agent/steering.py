"""Steering a running job from its spec: bandwidth and pause, live.

Owns: turning `spec.bandwidth` and `spec.paused` into driver calls on a job that runs, and
saying each change once (an Event and a log line), including an edit made while the agent
was away. The speed it sets is the job's share that the node scheduler hands out
(`blockpull.agent.scheduler`): `spec.bandwidth` itself when the node has no budget.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from blockpull.agent.kube import ObjectRef
from blockpull.agent.scheduler import NodeScheduler
from blockpull.agent.views import rate
from blockpull.driver import BlockJobDriver, Progress

log = logging.getLogger(__name__)

#: Posts an Event on the object: (type, reason, message).
EventSink = Callable[[str, str, str], Awaitable[None]]


class Steering:
    def __init__(
        self,
        ref: ObjectRef,
        job_id: str,
        event: EventSink,
        *,
        scheduler: NodeScheduler,
        on_share_change: Callable[[], None],
    ) -> None:
        self._ref = ref
        self._job_id = job_id
        self._event = event
        self._scheduler = scheduler
        #: Called when another job's start, end, pause or edit moved this job's share.
        self._on_share_change = on_share_change
        #: spec.paused as last applied; None until the first apply (a re-attach).
        self._applied_paused: bool | None = None
        #: spec.paused asks for a pause the driver cannot do (libvirt): the job keeps running.
        self.pause_unsupported = False

    def started(self, paused: bool) -> None:
        """The job was started with this state (it needs no steering yet)."""
        self._applied_paused = paused

    def starting(self, own_bandwidth: int) -> int:
        """The speed a job about to start gets: its share."""
        return self._scheduler.copying(self._ref.uid, own_bandwidth, self._on_share_change)

    async def apply(
        self, driver: BlockJobDriver, job: Progress, *, own_bandwidth: int, paused: bool, initial: bool
    ) -> None:
        """Bring the job in line with its share of `own_bandwidth` (spec.bandwidth) and with
        `paused` (a no-op when it already is)."""
        if paused and driver.can_pause:
            # A paused job copies nothing: it takes no share of the node's budget meanwhile.
            self._scheduler.stopped_copying(self._ref.uid)
            bandwidth = job.speed
        else:
            bandwidth = self.starting(own_bandwidth)
        if job.speed != bandwidth:
            await driver.set_speed(self._job_id, bandwidth)
            budget = self._scheduler.budget
            share = f" (its share of the node's budget of {rate(budget)})" if budget else ""
            await self._say(
                "Normal", "BandwidthChanged", f"bandwidth {rate(job.speed)} -> {rate(bandwidth)}{share}"
            )
        self.pause_unsupported = paused and not driver.can_pause
        if self.pause_unsupported:
            # libvirt has no block-job pause: say so once per request and leave the job
            # running; never pause it behind the hypervisor API's back.
            if self._applied_paused is not True:
                await self._say(
                    "Warning",
                    "PauseUnsupported",
                    f"spec.paused is true but {driver.describe} cannot pause a block job; it keeps running",
                )
        elif paused and not job.paused:
            await driver.pause(self._job_id)
            await self._say("Normal", "Paused", "paused the stream (spec.paused=true)")
        elif not paused and job.paused and job.io_status == "ok":
            await driver.resume(self._job_id)
            await self._say("Normal", "Resumed", "resumed the stream (spec.paused=false)")
        elif not paused and job.paused and not initial and self._applied_paused:
            # A job stopped by onError=stop/enospc is paused with io-status failed/nospace;
            # resuming it is a retry, which only spec.paused going true then false asks for.
            await driver.resume(self._job_id)
            await self._say("Normal", "Resumed", f"retrying after I/O error ({job.io_status})")
        self._applied_paused = paused

    async def _say(self, kind: str, reason: str, message: str) -> None:
        log.info("%s: job %s: %s", self._ref, self._job_id, message)
        await self._event(kind, reason, message)
