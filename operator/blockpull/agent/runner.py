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

from blockpull import pull as protocol
from blockpull.agent import status as st
from blockpull.agent import views
from blockpull.agent.kube import ObjectRef
from blockpull.agent.metrics import AgentMetrics
from blockpull.agent.outcomes import OutcomeWriter
from blockpull.agent.record import PullRecord, job_id_for
from blockpull.agent.reporter import Reporter
from blockpull.agent.settings import AgentSettings
from blockpull.agent.spec import PullSpec
from blockpull.agent.steering import Steering
from blockpull.agent.vms import VMs
from blockpull.driver import BlockJobDriver, Outcome, Progress, StreamRequest
from blockpull.errors import (
    BlockPullError,
    DeadlineExceeded,
    Disconnected,
    DiskBusy,
    JobNotFound,
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


class _HeldPaused(TransientError):
    """Created with spec.paused: QEMU cannot start a job paused, so it is not started yet."""

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
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.state = state
        self.reporter = reporter
        self.vms = vms
        self.settings = settings
        self.metrics = metrics or AgentMetrics(settings.node_name)
        self.job_id = self.record.job_id or job_id_for(state.ref.uid)
        self.steering = Steering(state.ref, self.job_id, reporter.event)
        self.outcomes = OutcomeWriter(state.ref, reporter, self.metrics, lambda: self.record)
        self._changed = asyncio.Event()
        self._abort = asyncio.Event()
        #: How a deletion's cancel ended (a Result value, or "timeout"); None: not confirmed.
        self.abort_outcome: str | None = None
        self._trouble: str | None = None  # the last reason QEMU could not be reached
        #: The newest spec generation that could not be applied, and why (see `reject`).
        self._rejected: views.Rejected = None
        self._warning: asyncio.Future[None] | None = None
        self._ended_unwatched = False  # re-attached to a job that had already concluded
        #: The job has ended and its outcome is being written and the job dismissed: a
        #: shutdown lets this finish (briefly) rather than leave a concluded job in QEMU.
        self.finishing = False
        self.collect_orphan: OrphanCollector | None = None

    @property
    def record(self) -> PullRecord:
        """The pull as its `.status` records it now."""
        return PullRecord.parse(self.reporter.status)

    # --- inputs from the manager ------------------------------------------------------------

    def update(self, spec: PullSpec, generation: int) -> None:
        self.state.spec = spec
        self.state.generation = generation
        self._rejected = None
        self._changed.set()

    def reject(self, generation: int, problem: str) -> None:
        """A spec edit the agent cannot apply: keep the last valid spec, say why once (an Event,
        a log line) and keep saying it in the status until a valid edit replaces it."""
        if self._rejected is not None and self._rejected[0] == generation:
            return
        self._rejected = (generation, problem)
        log.warning("%s: spec generation %d not applied: %s", self.state.ref, generation, problem)
        self._warning = asyncio.ensure_future(self.reporter.event("Warning", "InvalidSpec", problem))
        self._changed.set()

    def request_abort(self) -> None:
        self._abort.set()

    # --- the lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        if self.record.terminal:
            return
        self._announce()
        try:
            await self._run()
        except PermanentError as exc:
            await self._fail(exc.reason, exc.message)
            return
        if self._abort.is_set():
            await self._warn_if_unconfirmed()

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
        while not self._abort.is_set():
            self._check_deadline()
            try:
                driver = await self.vms.driver_for(namespace, spec.vm)
                if await self._attach_or_start(driver):
                    await self._follow(driver)
                return
            except TransientError as exc:  # the VM is not ready (API trouble goes to the manager)
                self._trouble = exc.message
                if isinstance(exc, Disconnected):
                    # QEMU went away mid-job. It may come back (a restart of the VM's QEMU):
                    # keep trying within the grace period, then record VMExited.
                    gone_since = gone_since or loop.time()
                if gone_since is None:
                    await self._pending(exc.reason, exc.message)
                else:
                    await self._wait_for_vm_return(exc, loop.time() - gone_since)
            await self._sleep(backoff)
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

    async def _attach_or_start(self, driver: BlockJobDriver) -> bool:
        """Re-attach to our job if the VM has it, otherwise start it (once). False when there
        is nothing to follow: the pull turned out to be finished already."""
        job = await driver.find_job(self.job_id)
        if job is not None:
            # A job held at `pending` waited for us with the chain intact; only a concluded one
            # ended without anyone watching.
            self._ended_unwatched = job.concluded
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
        if self.record.started and not await self._restart_lost_job(driver):
            return False
        await self._start(driver)
        return True

    async def _restart_lost_job(self, driver: BlockJobDriver) -> bool:
        """The VM no longer knows the job we started (dismissed by someone else, or QEMU
        restarted): the disk's chain says whether the pull is done. True: start it again."""
        spec = self.state.spec
        if await driver.pulled(spec.disk, self.record.base_node or spec.base):
            await self.outcomes.completed(None, "the pull finished while the agent was away")
            return False
        await self.reporter.event(
            "Warning",
            "Restarted",
            "QEMU no longer knows the job and the disk still needs its backing images (QEMU "
            "restarted?); starting the pull again",
        )
        return True

    async def _start(self, driver: BlockJobDriver) -> None:
        spec = self.state.spec
        if spec.paused:
            # Starting then pausing would copy some data first; wait for paused=false instead.
            raise _HeldPaused("spec.paused is true: the pull starts when it is set to false")
        request = StreamRequest(
            disk=spec.disk,
            job_id=self.job_id,
            base=spec.base,
            bandwidth=spec.bandwidth,
            on_error=spec.on_error,
        )
        try:
            started = await driver.start(request)
        except DiskBusy as exc:
            raise await explain_busy(
                driver, spec.disk, exc, node=self.settings.node_name, collect_orphan=self.collect_orphan
            ) from exc
        self.steering.started(paused=False)
        await self.reporter.transition(
            views.started(self.job_id, spec.disk, started, spec.bandwidth, st.now_rfc3339())
        )
        self.metrics.job_started(self.state.ref)
        await self.reporter.event("Normal", "Started", f"started QEMU job {self.job_id} on {spec.disk}")

    # --- following a job ----------------------------------------------------------------------

    async def _follow(self, driver: BlockJobDriver) -> None:
        try:
            await self._follow_job(driver)
        except JobNotFound:
            await self._vanished(driver)

    async def _vanished(self, driver: BlockJobDriver) -> None:
        """Our job disappeared from a QEMU that is still there: someone else dismissed it."""
        self.finishing = True
        if await driver.pulled(self.state.spec.disk, self.record.base_node or self.state.spec.base):
            await driver.make_durable(self.record.device)
            await self.outcomes.completed(None, "the job was dismissed outside BlockPull after it completed")
            return
        await self._fail(
            "Cancelled", "the QEMU job disappeared (cancelled and dismissed outside BlockPull); chain intact"
        )

    async def _follow_job(self, driver: BlockJobDriver) -> None:
        """Follow the job to its end, applying spec changes, deadline and abort on the way."""
        await self._steer(driver, initial=True)
        waiter = asyncio.create_task(
            protocol.follow(
                driver, self.job_id, on_progress=self._on_progress, poll_interval=self.settings.poll_interval
            )
        )
        try:
            while True:
                woke = await self._wait(self._seconds_to_deadline(), waiter)
                if waiter.done():
                    waiter.result()  # a vanished job (JobNotFound) or a lost VM propagates
                    await self._finish(driver)
                    return
                if self._abort.is_set():
                    await self._cancel_and_finish(driver, reason=None)
                    return
                if woke:
                    self._changed.clear()
                    await self._steer(driver, initial=False)
                elif self._seconds_to_deadline() == 0:
                    await self._cancel_and_finish(driver, reason=DeadlineExceeded.reason)
                    return
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError, BlockPullError):
                    await waiter

    async def _wait(self, timeout: float | None, job_end: asyncio.Task[Progress] | None = None) -> bool:
        """Until an abort, a spec change (True), the job's end or the timeout (False)."""
        changed = asyncio.create_task(self._changed.wait())
        abort = asyncio.create_task(self._abort.wait())
        try:
            waits = {changed, abort} if job_end is None else {changed, abort, job_end}
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when the runner itself is cancelled (agent shutdown): a leaked wait task
            # makes kopf wait for "hung tasks" before the process can exit.
            changed.cancel()
            abort.cancel()
        return changed in done

    async def _steer(self, driver: BlockJobDriver, *, initial: bool) -> None:
        spec = self.state.spec
        job = await self._job(driver)
        if job.ended:
            return
        await self.steering.apply(driver, job, bandwidth=spec.bandwidth, paused=spec.paused, initial=initial)
        job = await self._job(driver)
        if initial:
            # Right after the Running write: only a phase change (e.g. re-attached to a paused
            # job) is worth a write now; progress waits its turn.
            await self._on_progress(job)
        else:
            # A spec edit: show its effect (bandwidth, phase, observedGeneration) at once.
            await self.reporter.transition(self._running_view(job))

    async def _job(self, driver: BlockJobDriver) -> Progress:
        job = await driver.find_job(self.job_id)
        if job is None:
            raise JobNotFound(f"QEMU has no block job {self.job_id!r}")
        return job

    async def _on_progress(self, job: Progress) -> None:
        self.metrics.progress(self.state.ref, job.offset, job.length)
        view = self._running_view(job)
        if view.phase != self.reporter.status.get("phase"):
            await self.reporter.transition(view)
        else:
            await self.reporter.progress(view)

    def _running_view(self, job: Progress) -> st.StatusView:
        return views.running(
            self.job_id,
            job,
            self.state.spec.on_error,
            self._rejected,
            pause_unsupported=self.steering.pause_unsupported,
        )

    # --- the end --------------------------------------------------------------------------------

    async def _finish(self, driver: BlockJobDriver) -> None:
        """The job has ended: finalize it durably, record its outcome, dismiss it."""
        self.finishing = True
        await protocol.conclude(driver, self.job_id, self.record.device, record=self._record_outcome)

    async def _cancel_and_finish(self, driver: BlockJobDriver, *, reason: str | None) -> None:
        """Cancel the job (a deletion: `reason` None; or a deadline), wait (bounded) for QEMU
        to confirm how it ended, and record that."""
        self.finishing = True
        log.info("%s: cancelling job %s (%s)", self.state.ref, self.job_id, reason or "deleted")
        timeout = self.settings.delete_timeout
        ended = await protocol.cancel_and_confirm(
            driver, self.job_id, timeout=timeout, poll_interval=self.settings.poll_interval
        )
        if ended is None:
            self.abort_outcome = "timeout"
            message = f"QEMU did not confirm the cancel of job {self.job_id} within {timeout:g}s"
            log.warning("%s: %s", self.state.ref, message)
            await self.reporter.event("Warning", "CancelTimeout", message)
            return

        async def record(outcome: Outcome) -> None:
            if reason is None:
                self.abort_outcome = outcome.result.value
            await self.outcomes.cancel_confirmed(
                outcome,
                deadline=None if reason is None else self.state.spec.active_deadline_seconds,
                unwatched=self._ended_unwatched,
            )

        await protocol.conclude(driver, self.job_id, self.record.device, record=record)

    async def _record_outcome(self, outcome: Outcome) -> None:
        await self.outcomes.job_ended(outcome, unwatched=self._ended_unwatched)

    async def _fail(self, reason: str, message: str, outcome: Outcome | None = None) -> None:
        await self.outcomes.failed(reason, message, outcome)

    async def _warn_if_unconfirmed(self) -> None:
        """Deleted while QEMU could not be asked to cancel a job we had started: say so."""
        if self.abort_outcome is not None or self.record.start_time is None:
            return  # QEMU confirmed (or timed out, already reported), or no job was ever started
        message = (
            f"deleted while QEMU could not be reached ({self._trouble or 'no answer'}); the finalizer "
            f"is removed without QEMU confirming that job {self.job_id} is cancelled"
        )
        log.warning("%s: %s", self.state.ref, message)
        await self.reporter.event("Warning", "AbortUnconfirmed", message)

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

    def _seconds_to_deadline(self) -> float | None:
        return seconds_left(
            self.state.spec.active_deadline_seconds, self.record.start_time or self.state.created
        )

    def _check_deadline(self) -> None:
        if self._seconds_to_deadline() == 0 and not self.record.job_id:
            raise DeadlineExceeded(
                f"activeDeadlineSeconds={self.state.spec.active_deadline_seconds} passed before the pull "
                f"could start ({self.record.message or 'pending'})"
            )

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake for an abort, a spec change or the deadline."""
        deadline = self._seconds_to_deadline()
        await self._wait(seconds if deadline is None else min(seconds, deadline + 0.05))
        self._changed.clear()


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


def seconds_left(deadline: int | None, since: datetime.datetime) -> float | None:
    """Seconds until `deadline` seconds after `since` (never below 0); None: no deadline."""
    if deadline is None:
        return None
    elapsed = (datetime.datetime.now(datetime.UTC) - since).total_seconds()
    return max(0.0, deadline - elapsed)
