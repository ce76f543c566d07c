"""The life of one BlockPull on its node: wait, start or re-attach, follow, steer, finish.

Owns: the lifecycle from the contract, for one object, as plain asyncio code with no kopf in
it. It only talks to QEMU through `blockpull.stream` and to Kubernetes through a `Reporter`,
so it can be driven by kopf handlers, or by a test, the same way.

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from blockpull import pull as protocol
from blockpull.agent import status as st
from blockpull.agent.kube import KubeAPIError, ObjectRef
from blockpull.agent.settings import AgentSettings
from blockpull.agent.spec import PullSpec
from blockpull.agent.vms import VMs
from blockpull.driver import BlockJobDriver, ChainImage, Outcome, Progress, Result, StreamRequest
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
from blockpull.quantity import format_bytes, progress_text

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Where the runner's view of the object goes (the status subresource and Events)."""

    async def transition(self, view: st.StatusView) -> None: ...
    async def progress(self, view: st.StatusView) -> None: ...
    async def event(self, kind: str, reason: str, message: str) -> None: ...
    @property
    def status(self) -> Mapping[str, Any]: ...


@dataclass
class ObjectState:
    """What the runner knows about its object; the manager refreshes spec/generation."""

    ref: ObjectRef
    spec: PullSpec
    generation: int
    created: datetime.datetime


class _Aborted(Exception):
    """Deletion asked the runner to stop."""


class _HeldPaused(TransientError):
    """Created with spec.paused: QEMU cannot start a job paused, so it is not started yet."""

    reason = "Paused"


# completionTime is when the agent learned the outcome: QEMU keeps no time for a concluded job.
_UNWATCHED = "the job ended while the agent was not watching; completionTime is when it was seen"


def job_id_for(uid: str) -> str:
    # Derived from the uid: unique per object and recomputable after an agent restart.
    return f"blockpull-{uid}"


class PullRunner:
    def __init__(
        self,
        state: ObjectState,
        reporter: Reporter,
        vms: VMs,
        settings: AgentSettings,
    ) -> None:
        self.state = state
        self.reporter = reporter
        self.vms = vms
        self.settings = settings
        self.job_id = str(reporter.status.get("jobId") or job_id_for(state.ref.uid))
        self._changed = asyncio.Event()
        self._abort = asyncio.Event()
        self._applied_bandwidth: int | None = None
        self._applied_paused: bool | None = None
        #: spec.paused asks for a pause the driver cannot do (libvirt): the job keeps running.
        self._pause_unsupported = False
        self.abort_outcome: str | None = None
        self._trouble: str | None = None  # the last reason QEMU could not be reached
        self._ended_unwatched = False  # re-attached to a job that had already ended
        #: The job has ended and its outcome is being written and the job dismissed: a
        #: shutdown lets this finish (briefly) rather than leave a concluded job in QEMU.
        self.finishing = False
        #: Set by the manager: collects an ended job of this agent whose object is gone
        #: (returns True when it did), so that it never holds a disk forever.
        self.collect_orphan: Callable[[BlockJobDriver, Progress], Awaitable[bool]] | None = None

    # --- inputs from the manager ------------------------------------------------------------

    def update(self, spec: PullSpec, generation: int) -> None:
        self.state.spec = spec
        self.state.generation = generation
        self._changed.set()

    def request_abort(self) -> None:
        self._abort.set()

    # --- the lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        if st.is_terminal(self.reporter.status):
            return
        try:
            await self._run()
        except _Aborted:
            await self._warn_if_unconfirmed()
            return
        except PermanentError as exc:
            await self._fail(exc.reason, exc.message)

    async def _run(self) -> None:
        spec = self.state.spec
        namespace = self.state.ref.namespace
        self.vms.locate(namespace, spec.vm)  # InvalidSpec (names that cannot be reached) fails at once
        backoff = 0.5
        vm_gone_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            self._check_abort()
            self._check_deadline()
            try:
                driver = await self.vms.driver_for(namespace, spec.vm)
                await self._ensure_job(driver)
                vm_gone_since = None
                await self._follow(driver)
                return
            except Disconnected as exc:
                self._trouble = exc.message
                # QEMU went away mid-job. It may come back (a restart of the VM's QEMU): keep
                # trying within the grace period, then record VMExited.
                vm_gone_since = vm_gone_since or loop.time()
                await self._wait_for_vm_return(exc, loop.time() - vm_gone_since)
            except KubeAPIError:
                raise  # the API, not the VM: the manager retries the whole runner
            except TransientError as exc:
                self._trouble = exc.message
                if vm_gone_since is not None:
                    await self._wait_for_vm_return(exc, loop.time() - vm_gone_since)
                else:
                    await self._pending(exc.reason, exc.message)
            await self._sleep(backoff)
            backoff = min(backoff * 2, self.settings.pending_backoff_max)

    async def _warn_if_unconfirmed(self) -> None:
        """Deleted while QEMU could not be asked to cancel a job we had started: say so."""
        if (
            not self._abort.is_set()  # not a deletion: the pull ended some other way
            or self.abort_outcome is not None
            or not self.reporter.status.get("startTime")
        ):
            return  # QEMU confirmed (or timed out, already reported), or no job was ever started
        await self.reporter.event(
            "Warning",
            "AbortUnconfirmed",
            f"deleted while QEMU could not be reached ({self._trouble or 'no answer'}); the finalizer "
            f"is removed without QEMU confirming that job {self.job_id} is cancelled",
        )

    async def _wait_for_vm_return(self, exc: BlockPullError, gone_for: float) -> None:
        if gone_for >= self.settings.vm_gone_grace:
            raise VMExited(
                f"QEMU went away during the pull and did not come back within "
                f"{self.settings.vm_gone_grace:g}s ({exc.message})"
            )
        await self._pending(
            QEMUUnavailable.reason,
            f"QEMU went away during the pull; waiting up to {self.settings.vm_gone_grace:g}s "
            f"for it to return ({exc.message})",
        )

    async def _ensure_job(self, driver: BlockJobDriver) -> None:
        """Re-attach to our job if QEMU has it; otherwise start it (once)."""
        job = await driver.find_job(self.job_id)
        if job is not None:
            # A job held at `pending` waited for us with the chain intact; only a concluded one
            # ended without anyone watching.
            self._ended_unwatched = job.concluded
            log.info("%s: re-attached to job %s (%s)", self.state.ref, self.job_id, protocol.job_state(job))
            if not job.concluded and "chain" not in self.reporter.status:
                await self._record_chain(driver)
            return
        spec = self.state.spec
        had_started = self.reporter.status.get("phase") in (st.RUNNING, st.PAUSED) or bool(
            self.reporter.status.get("startTime")
        )
        if had_started:
            # QEMU no longer knows the job we started: it was dismissed, or QEMU restarted.
            if await driver.pulled(spec.disk, self._base_for_judging()):
                await self._complete(None, "the pull finished while the agent was away")
                raise _Aborted
            await self.reporter.event(
                "Warning", "Restarted", "QEMU no longer knows the job and the disk still needs its backing "
                "images (QEMU restarted?); starting the pull again",
            )  # fmt: skip
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
            raise await self._explain_busy(driver, exc) from exc
        self._applied_bandwidth = spec.bandwidth
        self._applied_paused = False
        await self.reporter.transition(
            st.StatusView(
                phase=st.RUNNING,
                reason="Streaming",
                message=f"streaming {spec.disk} from {len(started.released_images)} backing image(s)",
                job_id=self.job_id,
                target={"node": started.device, "base": started.base_node},
                chain=_chain_entries(started.chain),
                # 0.00% at once (a blank PROGRESS column reads as "nothing known").
                offset=0,
                length=started.chain[0].virtual_size if started.chain else 0,
                bandwidth=spec.bandwidth,
                start_time=st.now_rfc3339(),
            )
        )
        await self.reporter.event("Normal", "Started", f"started QEMU job {self.job_id} on {spec.disk}")

    async def _explain_busy(self, driver: BlockJobDriver, exc: DiskBusy) -> DiskBusy:
        """Name the jobs holding the disk; collect an ended one of this agent's, whose object is
        gone (its id is derived from a uid no object has any more)."""
        try:
            jobs = await driver.blocking_jobs(self.state.spec.disk)
        except BlockPullError:
            return exc
        for job in jobs:
            if job.ended and self.collect_orphan is not None and await self.collect_orphan(driver, job):
                return DiskBusy(f"collected the ended job {job.job_id} of a deleted BlockPull; retrying")
        return DiskBusy(
            protocol.busy_message(
                self.state.spec.disk,
                jobs,
                lambda job: f"on node {self.settings.node_name} run `{driver.collect_command(job)}`",
            )
        )

    async def _record_chain(self, driver: BlockJobDriver) -> None:
        # Re-attached after a restart that happened before the chain was written: the chain is
        # still whole while the job runs (or waits at pending), so read it now for
        # releasedImages later.
        with contextlib.suppress(TransientError, PermanentError):
            chain = await driver.chain(self.state.spec.disk)
            base = self.state.spec.base
            base_node = next((i.node for i in chain[1:] if base in (i.node, i.filename)), None)
            await self.reporter.transition(
                st.StatusView(
                    phase=self._phase_now(),
                    reason="Streaming",
                    message="re-attached to the running job",
                    job_id=self.job_id,
                    chain=_chain_entries(chain),
                    target={"node": chain[0].node, "base": base_node},
                )
            )

    def _base_for_judging(self) -> str | None:
        target = self.reporter.status.get("target") or {}
        return str(target.get("base") or "") or self.state.spec.base

    async def _follow(self, driver: BlockJobDriver) -> None:
        try:
            await self._follow_job(driver)
        except JobNotFound:
            await self._vanished(driver)

    async def _vanished(self, driver: BlockJobDriver) -> None:
        """Our job disappeared from a QEMU that is still there: someone else dismissed it."""
        self.finishing = True
        if await driver.pulled(self.state.spec.disk, self._base_for_judging()):
            await driver.make_durable((self.reporter.status.get("target") or {}).get("node"))
            await self._complete(None, "the job was dismissed outside BlockPull after it completed")
            return
        await self._fail(
            "Cancelled",
            "the QEMU job disappeared (cancelled and dismissed outside BlockPull); chain intact",
        )

    async def _follow_job(self, driver: BlockJobDriver) -> None:
        """Follow the job to its end, applying spec changes, deadline and abort on the way."""
        await self._apply_spec(driver, initial=True)
        waiter = asyncio.create_task(
            protocol.follow(
                driver, self.job_id, on_progress=self._on_progress, poll_interval=self.settings.poll_interval
            )
        )
        try:
            while True:
                changed = asyncio.create_task(self._changed.wait())
                abort = asyncio.create_task(self._abort.wait())
                timeout = self._seconds_to_deadline()
                try:
                    done, _ = await asyncio.wait(
                        {waiter, changed, abort}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    # Also when the runner itself is cancelled (agent shutdown): a leaked wait
                    # task makes kopf wait for "hung tasks" before the process can exit.
                    changed.cancel()
                    abort.cancel()
                if waiter in done:
                    await self._finish(driver, waiter.result())
                    return
                if abort in done:
                    await self._cancel_and_finish(driver, reason=None)
                    raise _Aborted
                if changed in done:
                    self._changed.clear()
                    await self._apply_spec(driver, initial=False)
                    continue
                if self._seconds_to_deadline() == 0:
                    await self._cancel_and_finish(driver, reason=DeadlineExceeded.reason)
                    return
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError, BlockPullError):
                    await waiter

    async def _apply_spec(self, driver: BlockJobDriver, *, initial: bool) -> None:
        spec = self.state.spec
        job = await self._job(driver)
        if job.ended:
            return
        if job.speed != spec.bandwidth:
            # Also on re-attach: an edit made while the agent was down is applied now, and said.
            await driver.set_speed(self.job_id, spec.bandwidth)
            change = f"bandwidth {_rate(job.speed)} -> {_rate(spec.bandwidth)}"
            log.info("%s: %s", self.state.ref, change)
            await self.reporter.event("Normal", "BandwidthChanged", change)
        self._applied_bandwidth = spec.bandwidth
        self._pause_unsupported = spec.paused and not driver.can_pause
        if self._pause_unsupported:
            # libvirt has no block-job pause: say so (once per request), keep the job running,
            # never pause it behind the hypervisor API's back.
            if self._applied_paused is not True:
                await self.reporter.event(
                    "Warning",
                    "PauseUnsupported",
                    f"spec.paused is true but {driver.describe} cannot pause a block job; it keeps running",
                )
        elif spec.paused and not job.paused:
            await driver.pause(self.job_id)
            log.info("%s: paused job %s", self.state.ref, self.job_id)
            await self.reporter.event("Normal", "Paused", "paused the stream (spec.paused=true)")
        elif not spec.paused and job.paused and job.io_status == "ok":
            # A job stopped by on-error=stop/enospc is paused with io-status failed/nospace;
            # resuming it is a retry, which only spec.paused going false->true->false asks for.
            await driver.resume(self.job_id)
            log.info("%s: resumed job %s", self.state.ref, self.job_id)
            await self.reporter.event("Normal", "Resumed", "resumed the stream (spec.paused=false)")
        elif not spec.paused and job.paused and not initial and self._applied_paused:
            await driver.resume(self.job_id)
            log.info("%s: retrying job %s after an I/O error", self.state.ref, self.job_id)
            await self.reporter.event("Normal", "Resumed", f"retrying after I/O error ({job.io_status})")
        self._applied_paused = spec.paused
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
        view = self._running_view(job)
        if view.phase != self.reporter.status.get("phase"):
            await self.reporter.transition(view)
        else:
            await self.reporter.progress(view)

    def _running_view(self, job: Progress) -> st.StatusView:
        if job.paused:
            reason = "Paused" if job.io_status == "ok" else f"PausedOnError{job.io_status.capitalize()}"
            message = (
                "paused by spec.paused"
                if job.io_status == "ok"
                else f"QEMU paused the job after an I/O error (io-status {job.io_status}, onError "
                f"{self.state.spec.on_error}); set paused true then false to retry"
            )
            phase = st.PAUSED
        else:
            phase, reason = st.RUNNING, "Streaming"
            message = f"streamed {format_bytes(job.offset)} of {format_bytes(job.length)}"
            if self._pause_unsupported:
                reason = "PauseUnsupported"
                message += "; spec.paused is true but the hypervisor API cannot pause a block job"
        return st.StatusView(
            phase=phase,
            reason=reason,
            message=message,
            job_id=self.job_id,
            offset=job.offset,
            length=job.length,
            bandwidth=job.speed,
        )

    def _phase_now(self) -> str:
        return str(self.reporter.status.get("phase") or st.RUNNING)

    async def _cancel_and_finish(self, driver: BlockJobDriver, *, reason: str | None) -> None:
        """Cancel the job, wait (bounded) for QEMU to confirm how it ended, and record that."""
        self.finishing = True
        why = "deleted" if reason is None else reason
        log.info("%s: cancelling job %s (%s)", self.state.ref, self.job_id, why)
        ended = await protocol.cancel_and_confirm(
            driver,
            self.job_id,
            timeout=self.settings.delete_timeout,
            poll_interval=self.settings.poll_interval,
        )
        if ended is None:
            self.abort_outcome = "timeout"
            message = (
                f"QEMU did not confirm the cancel of job {self.job_id} within "
                f"{self.settings.delete_timeout:g}s"
            )
            log.warning("%s: %s", self.state.ref, message)
            await self.reporter.event("Warning", "CancelTimeout", message)
            return

        async def record(outcome: Outcome) -> None:
            if reason is None:  # deletion: say what really happened, then let the object go
                self.abort_outcome = outcome.result.value
                if outcome.result is Result.CANCELLED:
                    message = f"cancelled QEMU job {self.job_id} at {_percent(outcome)}; chain intact"
                    log.info("%s: %s", self.state.ref, message)
                    await self.reporter.event("Normal", "Cancelled", message)
                    return
            elif outcome.result is Result.CANCELLED:
                await self._fail(
                    reason,
                    f"activeDeadlineSeconds={self.state.spec.active_deadline_seconds} exceeded; job "
                    f"cancelled at {_percent(outcome)}, chain intact",
                    outcome,
                )
                return
            await self._record_outcome(outcome)  # it had completed (or failed) before the cancel

        await protocol.conclude(driver, self.job_id, self._device(), record=record)

    async def _finish(self, driver: BlockJobDriver, ended: Progress) -> None:
        """The job has ended: finalize it durably, record its outcome, dismiss it."""
        self.finishing = True
        await protocol.conclude(driver, self.job_id, self._device(), record=self._record_outcome)

    def _device(self) -> str | None:
        node = (self.reporter.status.get("target") or {}).get("node")
        return str(node) if node else None

    async def _record_outcome(self, outcome: Outcome) -> None:
        if outcome.result is Result.COMPLETED:
            await self._complete(outcome, _UNWATCHED if self._ended_unwatched else None)
        elif outcome.result is Result.FAILED:
            note = f" ({_UNWATCHED})" if self._ended_unwatched else ""
            await self._fail("IOError", (outcome.error or "the job failed") + note, outcome)
        else:
            await self._fail(
                "Cancelled", "the QEMU job was cancelled outside BlockPull; chain intact", outcome
            )

    async def _complete(self, outcome: Outcome | None, note: str | None) -> None:
        released = self._released()
        length = outcome.length if outcome else int(self.reporter.status.get("length") or 0)
        # What was pulled, and how big the disk is: QEMU's length is the virtual size, not the
        # amount copied (a pull to a base may copy a few MiB of a 128 MiB disk).
        copied = f"{len(released)} backing image(s)" if released else "nothing (no backing file)"
        message = f"pulled the data of {copied} into the disk (virtual size {format_bytes(length)})"
        if note:
            message = f"{message}; {note}"
        await self.reporter.transition(
            st.StatusView(
                phase=st.COMPLETED,
                reason="Completed",
                message=message,
                offset=outcome.offset if outcome else length,
                length=length,
                completion_time=st.now_rfc3339(),
                released_images=released,
            )
        )
        await self.reporter.event("Normal", "Completed", message)

    def _released(self) -> list[str]:
        """Images above the base (all backing images without one), from the chain recorded at start."""
        chain = list(self.reporter.status.get("chain") or [])
        base_node = (self.reporter.status.get("target") or {}).get("base")
        released: list[str] = []
        for entry in chain[1:]:
            if base_node is not None and entry.get("node") == base_node:
                break
            released.append(str(entry.get("file")))
        return released

    async def _fail(self, reason: str, message: str, outcome: Outcome | None = None) -> None:
        await self.reporter.transition(
            st.StatusView(
                phase=st.FAILED,
                reason=reason,
                message=message,
                offset=outcome.offset if outcome else None,
                length=outcome.length if outcome else None,
                completion_time=st.now_rfc3339(),
            )
        )
        await self.reporter.event("Warning", "Failed", f"{reason}: {message}")

    async def _pending(self, reason: str, message: str) -> None:
        status = self.reporter.status
        if (
            status.get("phase") == st.PENDING
            and status.get("reason") == reason
            and status.get("message") == message
        ):
            return
        await self.reporter.transition(st.StatusView(phase=st.PENDING, reason=reason, message=message))

    # --- time ---------------------------------------------------------------------------------

    def _seconds_to_deadline(self) -> float | None:
        deadline = self.state.spec.active_deadline_seconds
        if deadline is None:
            return None
        started = st.parse_time(self.reporter.status.get("startTime")) or self.state.created
        elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
        return max(0.0, deadline - elapsed)

    def _check_deadline(self) -> None:
        if self._seconds_to_deadline() == 0 and not self.reporter.status.get("jobId"):
            raise DeadlineExceeded(
                f"activeDeadlineSeconds={self.state.spec.active_deadline_seconds} passed before the pull "
                f"could start ({self.reporter.status.get('message', 'pending')})"
            )

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise _Aborted

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake for an abort, a spec change or the deadline."""
        deadline = self._seconds_to_deadline()
        if deadline is not None:
            seconds = min(seconds, deadline + 0.05)
        abort = asyncio.create_task(self._abort.wait())
        changed = asyncio.create_task(self._changed.wait())
        try:
            await asyncio.wait({abort, changed}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
            changed.cancel()
        self._changed.clear()


def _chain_entries(chain: tuple[ChainImage, ...]) -> list[dict[str, str]]:
    return [{"node": image.node, "file": image.filename} for image in chain]


def _rate(bandwidth: int) -> str:
    return "unlimited" if bandwidth == 0 else f"{format_bytes(bandwidth)}/s"


def _percent(outcome: Outcome) -> str:
    return progress_text(outcome.offset, outcome.length)
