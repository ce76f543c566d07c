"""The life of one BlockPull on its node: wait, start or re-attach, follow, steer, finish.

Owns: the lifecycle from the contract, for one object, as plain asyncio code with no kopf in
it. It reaches the VM through a block-job driver (`blockpull.driver`) and the protocol
sequences written once in `blockpull.pull`; Kubernetes only through a `Reporter`; what the
status says comes from `blockpull.agent.views`, live steering from `blockpull.agent.steering`.
So it can be driven by the kopf handlers, or by a test with fakes, the same way.

Rules it keeps:
- The job id is derived from the object's uid, so a job started just before a crash is found
  again after restart (never a second job, never a copy restarted from zero).
- A job's end goes through `blockpull.pull.conclude`: the chain changes only after the copied
  data is flushed, and the outcome (with `releasedImages`) is written to `.status` only after
  that, before the QEMU job is dismissed.
- Waiting is not failing: a missing VM, a silent QEMU or a busy disk keep the object Pending
  with a reason, retried with capped backoff until its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from blockpull import pull as protocol
from blockpull.agent import status as st
from blockpull.agent import views
from blockpull.agent.clock import WallClock, utc_now
from blockpull.agent.ending import JobEnding
from blockpull.agent.following import JobFollower
from blockpull.agent.kube import ObjectRef
from blockpull.agent.metrics import AgentMetrics
from blockpull.agent.outcomes import OutcomeWriter
from blockpull.agent.record import PullRecord, job_id_for
from blockpull.agent.reporter import Reporter
from blockpull.agent.scheduler import NodeScheduler
from blockpull.agent.scheduling import QueueKey
from blockpull.agent.settings import AgentSettings
from blockpull.agent.spec import PullSpec
from blockpull.agent.steering import Steering
from blockpull.agent.vms import VMs
from blockpull.agent.wakeups import Wakeups
from blockpull.driver import BlockJobDriver, Progress, StreamRequest
from blockpull.errors import (
    BlockPullError,
    DeadlineExceeded,
    Disconnected,
    DiskBusy,
    PermanentError,
    QEMUUnavailable,
    TransientError,
    VMExited,
)

log = logging.getLogger(__name__)


@dataclass
class ObjectState:
    """What the runner knows about its object; the manager refreshes spec/generation."""

    ref: ObjectRef
    spec: PullSpec
    generation: int
    created: datetime.datetime

    @property
    def queue_key(self) -> QueueKey:
        return QueueKey(self.created, self.ref.namespace, self.ref.name)


class _HeldPaused(TransientError):
    """Created with spec.paused: QEMU cannot start a job paused, so it is not started yet (and
    holds no node slot)."""

    reason = "Paused"


#: Collects an ended job of this agent whose object is gone; True when it did (the manager's).
OrphanCollector = Callable[[BlockJobDriver, Progress], Awaitable[bool]]


class PullRunner:
    def __init__(
        self,
        state: ObjectState,
        reporter: Reporter,
        vms: VMs,
        settings: AgentSettings,
        *,
        metrics: AgentMetrics | None = None,
        scheduler: NodeScheduler | None = None,
        clock: WallClock = utc_now,
    ) -> None:
        self.state = state
        self.reporter = reporter
        self.vms = vms
        self.settings = settings
        self.metrics = metrics or AgentMetrics(settings.node_name)
        self.scheduler = scheduler or NodeScheduler(limit=0, budget=0)
        self.job_id = self.record.job_id or job_id_for(state.ref.uid)
        self.wakeups = Wakeups(
            deadline=lambda: self.state.spec.active_deadline_seconds,
            # Not started yet (queued, say): the deadline counts from the object's creation.
            since=lambda: self.record.start_time or self.state.created,
            clock=clock,
        )
        self._clock = clock
        self.steering = Steering(
            state.ref,
            self.job_id,
            reporter.event,
            scheduler=self.scheduler,
            on_share_change=self.wakeups.changed.set,
        )
        self.outcomes = OutcomeWriter(state.ref, reporter, self.metrics, lambda: self.record, clock)
        self.ending = JobEnding(
            state.ref,
            self.job_id,
            settings,
            reporter,
            self.outcomes,
            record=lambda: self.record,
            spec=lambda: self.state.spec,
        )
        self._trouble: str | None = None  # the last reason QEMU could not be reached
        #: The newest spec generation that could not be applied, and why (see `reject`).
        self._rejected: views.Rejected = None
        self._warning: asyncio.Future[None] | None = None
        self.collect_orphan: OrphanCollector | None = None
        #: A job of this object was started or found in its VM (by this runner).
        self.has_job = False
        self.following = JobFollower(
            state,
            self.job_id,
            settings.poll_interval,
            reporter,
            self.metrics,
            steering=self.steering,
            ending=self.ending,
            wakeups=self.wakeups,
            rejected=lambda: self._rejected,
        )

    @property
    def record(self) -> PullRecord:
        """The pull as its `.status` records it now."""
        return PullRecord.parse(self.reporter.status)

    @property
    def finishing(self) -> bool:
        """The job's end is being recorded (see `JobEnding.finishing`)."""
        return self.ending.finishing

    # --- inputs from the manager ------------------------------------------------------------

    def update(self, spec: PullSpec, generation: int) -> None:
        self.state.spec = spec
        self.state.generation = generation
        self._rejected = None
        self.wakeups.changed.set()

    def reject(self, generation: int, problem: str) -> None:
        """A spec edit the agent cannot apply: keep the last valid spec, say why once (an Event,
        a log line) and keep saying it in the status until a valid edit replaces it."""
        if self._rejected is not None and self._rejected[0] == generation:
            return
        self._rejected = (generation, problem)
        log.warning("%s: spec generation %d not applied: %s", self.state.ref, generation, problem)
        self._warning = asyncio.ensure_future(self.reporter.event("Warning", "InvalidSpec", problem))
        self.wakeups.changed.set()

    def request_abort(self) -> None:
        self.wakeups.aborted.set()

    # --- the lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        if self.record.terminal:
            return
        try:
            await self._run()
        except PermanentError as exc:
            await self.outcomes.failed(exc.reason, exc.message)
            return
        if self.wakeups.aborted.is_set():
            await self.ending.warn_if_unconfirmed(self._trouble)

    def _announce(self) -> None:
        """A new object's first status, at first sight: until an object has status, kstatus
        (Flux, kpt) reads it as done, so that window must be as short as can be. Written while
        the QMP work goes on (not before it): in a burst of creates, waiting for this write
        delayed every job's start by the API's queue."""
        if not self.reporter.status:
            self.metrics.pending(self.state.ref, "Starting")
            self.reporter.transition_soon(
                views.pending("Starting", "the agent is connecting to the VM's QEMU")
            )

    async def _run(self) -> None:
        """Until the pull has an outcome, or a deletion stopped it (returns), or it cannot
        succeed (PermanentError)."""
        spec = self.state.spec
        namespace = self.state.ref.namespace
        self.vms.locate(namespace, spec.vm)  # InvalidSpec (names that cannot be reached) fails at once
        backoff = 0.5
        gone_since: float | None = None
        loop = asyncio.get_running_loop()
        while not self.wakeups.aborted.is_set():
            self._check_deadline()
            try:
                if not await self._take_slot():
                    continue  # woken while queued: an abort, a spec edit or the deadline
                driver = await self.vms.driver_for(namespace, spec.vm)
                if await self._attach_or_start(driver):
                    await self.following.follow(driver)
                return
            except TransientError as exc:  # the VM is not ready (API trouble goes to the manager)
                self._trouble = exc.message
                if not self.record.started:
                    # It could not start: the slot goes to the next object; this one keeps its
                    # place in the queue (its creation time) for when it asks again.
                    self.scheduler.release(self.state.ref.uid)
                if isinstance(exc, Disconnected):
                    # QEMU went away mid-job. It may come back (a restart of the VM's QEMU):
                    # keep trying within the grace period, then record VMExited.
                    gone_since = gone_since or loop.time()
                if gone_since is None:
                    await self._pending(exc.reason, exc.message)
                else:
                    await self._wait_for_vm_return(exc, loop.time() - gone_since)
            await self.wakeups.sleep(backoff)
            backoff = min(backoff * 2, self.settings.pending_backoff_max)

    async def _wait_for_vm_return(self, exc: BlockPullError, gone_for: float) -> None:
        grace = self.settings.vm_gone_grace
        if gone_for >= grace:
            raise VMExited(
                f"QEMU went away during the pull and did not come back within {grace:g}s ({exc.message})"
            )
        await self._pending(
            QEMUUnavailable.reason,
            f"QEMU went away during the pull; waiting up to {grace:g}s for it to return ({exc.message})",
        )

    # --- the node's slots -----------------------------------------------------------------------

    async def _take_slot(self) -> bool:
        """True once this object may go to its VM: it has a job there already (it holds a slot
        whatever the limit: a re-attach never waits), or the scheduler granted it one. False
        when woken while queued (an abort, a spec edit, the deadline). A queued object sends
        nothing to its VM and writes its status once."""
        uid = self.state.ref.uid
        if self.record.started:
            self.scheduler.hold(uid)
            return True
        if self.state.spec.paused:
            # Starting then pausing would copy some data first; wait for paused=false instead.
            self.scheduler.release(uid)
            raise _HeldPaused("spec.paused is true: the pull starts when it is set to false")
        grant = self.scheduler.request(uid, self.state.queue_key)
        if grant.done():
            self._announce()
            return True
        if self.scheduler.is_open:
            await self._queued()
            waits: tuple[asyncio.Future[Any], ...] = (grant,)
        else:  # an agent restart: the queue is being rebuilt from the full list
            self._announce()
            waits = (grant, asyncio.ensure_future(self.scheduler.opened.wait()))
        try:
            await self.wakeups.wait(*waits)
        finally:
            for waited in waits[1:]:
                waited.cancel()
        self.wakeups.changed.clear()
        return grant.done() and not self.wakeups.aborted.is_set()

    async def _queued(self) -> None:
        """Pending/Queued with the object's place, written once: the place is not rewritten as
        the queue moves (a status write per queued object per start)."""
        record, reason = self.record, views.QUEUED
        if (record.phase, record.reason, record.observed_generation) == (
            st.PENDING,
            reason,
            self.state.generation,
        ):
            self.metrics.pending(self.state.ref, reason)  # `_pending` does this otherwise
            return
        await self._pending(
            reason, views.queued_message(self.scheduler.ahead_of(self.state.ref.uid), self.scheduler.limit)
        )

    # --- starting -------------------------------------------------------------------------------

    async def _attach_or_start(self, driver: BlockJobDriver) -> bool:
        """Re-attach to our job if the VM has it, otherwise start it (once). False when there
        is nothing to follow: the pull turned out to be finished already."""
        job = await driver.find_job(self.job_id)
        if job is not None:
            # A job held at `pending` waited for us with the chain intact; only a concluded one
            # ended without anyone watching.
            self.ending.unwatched = job.concluded
            self.has_job = True
            self.scheduler.hold(self.state.ref.uid)
            log.info("%s: re-attached to job %s (%s)", self.state.ref, self.job_id, protocol.job_state(job))
            started = self.record.start_time
            self.metrics.job_started(
                self.state.ref, offset=job.offset, started_at=started.timestamp() if started else None
            )
            if not job.concluded and not self.record.chain:
                with contextlib.suppress(TransientError, PermanentError):
                    chain = await driver.chain(self.state.spec.disk)
                    view = views.reattached(
                        self.job_id, chain, self.state.spec.base, self.record.phase or st.RUNNING
                    )
                    await self.reporter.transition(view)
            return True
        if self.record.started and not await self.ending.restart_lost(driver):
            return False
        await self._start(driver)
        return True

    async def _start(self, driver: BlockJobDriver) -> None:
        spec = self.state.spec
        if spec.paused:
            raise _HeldPaused("spec.paused is true: the pull starts when it is set to false")
        bandwidth = self.steering.starting(spec.bandwidth)
        request = StreamRequest(
            disk=spec.disk,
            job_id=self.job_id,
            base=spec.base,
            bandwidth=bandwidth,
            on_error=spec.on_error,
        )
        try:
            started = await driver.start(request)
        except DiskBusy as exc:
            raise await explain_busy(
                driver, spec.disk, exc, node=self.settings.node_name, collect_orphan=self.collect_orphan
            ) from exc
        self.has_job = True
        self.steering.started(paused=False)
        await self.reporter.transition(
            views.started(self.job_id, spec.disk, started, bandwidth, st.now_rfc3339(self._clock()))
        )
        self.metrics.job_started(self.state.ref)
        await self.reporter.event("Normal", "Started", f"started QEMU job {self.job_id} on {spec.disk}")

    # --- following a job ----------------------------------------------------------------------

    async def _pending(self, reason: str, message: str) -> None:
        self.metrics.pending(self.state.ref, reason)
        view = views.pending(reason, message, self._rejected)
        record = self.record
        if (record.phase, record.reason, record.message, record.observed_generation) == (
            st.PENDING,
            reason,
            view.message,
            self.state.generation,
        ):
            return
        await self.reporter.transition(view)

    # --- time ---------------------------------------------------------------------------------

    def _check_deadline(self) -> None:
        if self.wakeups.seconds_to_deadline() == 0 and not self.record.job_id:
            raise DeadlineExceeded(
                f"activeDeadlineSeconds={self.state.spec.active_deadline_seconds} passed before the pull "
                f"could start ({self.record.message or 'pending'})"
            )


async def explain_busy(
    driver: BlockJobDriver, disk: str, exc: DiskBusy, *, node: str, collect_orphan: OrphanCollector | None
) -> DiskBusy:
    """Name the jobs holding the disk; collect an ended one of this agent's whose object is
    gone (its id is derived from a uid no object has any more)."""
    try:
        jobs = await driver.blocking_jobs(disk)
    except BlockPullError:
        return exc
    for job in jobs:
        if job.ended and collect_orphan is not None and await collect_orphan(driver, job):
            return DiskBusy(f"collected the ended job {job.job_id} of a deleted BlockPull; retrying")
    # The agent holds its own monitor, and a QMP monitor serves one client at a time: the admin
    # runs the command on another monitor of the VM.
    return DiskBusy(
        protocol.busy_message(
            disk,
            jobs,
            lambda job: (
                f"on node {node} run `{driver.collect_command(job)}` "
                "against a QMP monitor of the VM other than the agent's"
            ),
        )
    )
