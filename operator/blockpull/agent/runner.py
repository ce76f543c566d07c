"""The life of one BlockPull on its node: wait, start or re-attach, follow, steer, finish.

Owns: the lifecycle from the contract, for one object, as plain asyncio code with no kopf in
it. It only talks to QEMU through `blockpull.stream` and to Kubernetes through a `Reporter`,
so it can be driven by kopf handlers, or by a test, the same way.

Rules it keeps:
- The job id is derived from the object's uid, so a job started just before a crash is found
  again after restart (never a second job, never a copy restarted from zero).
- The outcome is written to `.status` before the QEMU job is dismissed.
- Waiting is not failing: a missing VM, a silent QEMU or a busy disk keep the object Pending
  with a reason, retried with capped backoff until its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from blockpull import stream
from blockpull.agent import status as st
from blockpull.agent.kube import KubeAPIError, ObjectRef
from blockpull.agent.metrics import AgentMetrics, JobResult
from blockpull.agent.settings import AgentSettings
from blockpull.agent.spec import PullSpec
from blockpull.agent.vms import VMConnections
from blockpull.chain import DiskChain, read_chain
from blockpull.errors import (
    BlockPullError,
    DeadlineExceeded,
    Disconnected,
    JobNotFound,
    PermanentError,
    QEMUUnavailable,
    TransientError,
    VMExited,
)
from blockpull.qmp import QMPConnection
from blockpull.quantity import format_bytes

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
        vms: VMConnections,
        settings: AgentSettings,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.state = state
        self.reporter = reporter
        self.vms = vms
        self.settings = settings
        self.metrics = metrics or AgentMetrics(settings.node_name)
        self.job_id = str(reporter.status.get("jobId") or job_id_for(state.ref.uid))
        self._changed = asyncio.Event()
        self._abort = asyncio.Event()
        self._applied_bandwidth: int | None = None
        self._applied_paused: bool | None = None
        self.abort_outcome: str | None = None
        self._trouble: str | None = None  # the last reason QEMU could not be reached
        self._ended_unwatched = False  # re-attached to a job that had already ended
        #: The job has ended and its outcome is being written and the job dismissed: a
        #: shutdown lets this finish (briefly) rather than leave a concluded job in QEMU.
        self.finishing = False

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
            await self._announce()
            await self._run()
        except _Aborted:
            await self._warn_if_unconfirmed()
            return
        except PermanentError as exc:
            await self._fail(exc.reason, exc.message)

    async def _run(self) -> None:
        spec = self.state.spec
        socket_path = self.settings.socket_template.path_for(self.state.ref.namespace, spec.vm)
        backoff = 0.5
        vm_gone_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            self._check_abort()
            self._check_deadline()
            try:
                conn = await self.vms.get(socket_path)
                await self._ensure_job(conn)
                vm_gone_since = None
                await self._follow(conn)
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

    async def _announce(self) -> None:
        """A new object's first status, before any QMP work: until an object has status,
        kstatus (Flux, kpt) reads it as done, so that window must be as short as can be."""
        if not self.reporter.status:
            await self._pending("Starting", "the agent is connecting to the VM's QEMU")

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

    async def _ensure_job(self, conn: QMPConnection) -> None:
        """Re-attach to our job if QEMU has it; otherwise start it (once)."""
        job = await stream.find_job(conn, self.job_id)
        if job is not None:
            self._ended_unwatched = job.concluded
            self._metrics_reattached(job)
            if not job.concluded and "chain" not in self.reporter.status:
                await self._record_chain(conn)
            return
        spec = self.state.spec
        had_started = self.reporter.status.get("phase") in (st.RUNNING, st.PAUSED) or bool(
            self.reporter.status.get("startTime")
        )
        if had_started:
            # QEMU no longer knows the job we started: it was dismissed, or QEMU restarted.
            verdict = await stream.judge_from_chain(conn, spec.disk, self._base_for_judging())
            if verdict is stream.Result.COMPLETED:
                await self._complete(None, "the pull finished while the agent was away")
                raise _Aborted
            await self.reporter.event(
                "Warning", "Restarted", "QEMU no longer knows the job and the disk still needs its backing "
                "images (QEMU restarted?); starting the pull again",
            )  # fmt: skip
        if spec.paused:
            # Starting then pausing would copy some data first; wait for paused=false instead.
            raise _HeldPaused("spec.paused is true: the pull starts when it is set to false")
        request = stream.StreamRequest(
            disk=spec.disk,
            job_id=self.job_id,
            base=spec.base,
            bandwidth=spec.bandwidth,
            on_error=spec.on_error,
        )
        started = await stream.start_stream(conn, request)
        self._applied_bandwidth = spec.bandwidth
        self._applied_paused = False
        chain = started.chain
        images = _chain_entries(chain) if chain else None
        target = {"node": chain.device if chain else None, "base": started.base_node}
        now = st.now_rfc3339()
        await self.reporter.transition(
            st.StatusView(
                phase=st.RUNNING,
                reason="Streaming",
                message=f"streaming {spec.disk} from {len(started.released_images)} backing image(s)",
                job_id=self.job_id,
                target=target,
                chain=images,
                bandwidth=spec.bandwidth,
                start_time=now,
            )
        )
        self.metrics.job_started(self.state.ref)
        await self.reporter.event("Normal", "Started", f"started QEMU job {self.job_id} on {spec.disk}")

    async def _record_chain(self, conn: QMPConnection) -> None:
        # Re-attached after a restart that happened before the chain was written: the chain is
        # still whole while the job runs, so read it now for releasedImages later.
        with contextlib.suppress(TransientError, PermanentError):
            chain = await read_chain(conn, self.state.spec.disk)
            await self.reporter.transition(
                st.StatusView(
                    phase=self._phase_now(),
                    reason="Streaming",
                    message="re-attached to the running job",
                    job_id=self.job_id,
                    chain=_chain_entries(chain),
                    target={"node": chain.device, "base": None},
                )
            )

    def _base_for_judging(self) -> str | None:
        target = self.reporter.status.get("target") or {}
        return str(target.get("base") or "") or self.state.spec.base

    async def _follow(self, conn: QMPConnection) -> None:
        try:
            await self._follow_job(conn)
        except JobNotFound:
            await self._vanished(conn)

    async def _vanished(self, conn: QMPConnection) -> None:
        """Our job disappeared from a QEMU that is still there: someone else dismissed it."""
        self.finishing = True
        verdict = await stream.judge_from_chain(conn, self.state.spec.disk, self._base_for_judging())
        if verdict is stream.Result.COMPLETED:
            await self._flush(conn)
            await self._complete(None, "the job was dismissed outside BlockPull after it completed")
            return
        await self._fail(
            "Cancelled",
            "the QEMU job disappeared (cancelled and dismissed outside BlockPull); chain intact",
        )

    async def _follow_job(self, conn: QMPConnection) -> None:
        """Follow the job to its end, applying spec changes, deadline and abort on the way."""
        await self._apply_spec(conn, initial=True)
        waiter = asyncio.create_task(
            stream.wait_for_outcome(
                conn, self.job_id, on_progress=self._on_progress, poll_interval=self.settings.poll_interval
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
                    await self._finish(conn, waiter.result())
                    return
                if abort in done:
                    await self._cancel_and_finish(conn, waiter, reason=None)
                    raise _Aborted
                if changed in done:
                    self._changed.clear()
                    await self._apply_spec(conn, initial=False)
                    continue
                if self._seconds_to_deadline() == 0:
                    await self._cancel_and_finish(conn, waiter, reason=DeadlineExceeded.reason)
                    return
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError, BlockPullError):
                    await waiter

    async def _apply_spec(self, conn: QMPConnection, *, initial: bool) -> None:
        spec = self.state.spec
        job = await stream.progress(conn, self.job_id)
        if job.concluded:
            return
        if job.speed != spec.bandwidth:
            await stream.set_bandwidth(conn, self.job_id, spec.bandwidth)
            if not initial or self._applied_bandwidth is not None:
                await self.reporter.event(
                    "Normal", "BandwidthChanged", f"bandwidth {_rate(job.speed)} -> {_rate(spec.bandwidth)}"
                )
        self._applied_bandwidth = spec.bandwidth
        if spec.paused and not job.paused:
            await stream.pause(conn, self.job_id)
            await self.reporter.event("Normal", "Paused", "paused the stream (spec.paused=true)")
        elif not spec.paused and job.paused and job.io_status == "ok":
            # A job stopped by on-error=stop/enospc is paused with io-status failed/nospace;
            # resuming it is a retry, which only spec.paused going false->true->false asks for.
            await stream.resume(conn, self.job_id)
            await self.reporter.event("Normal", "Resumed", "resumed the stream (spec.paused=false)")
        elif not spec.paused and job.paused and not initial and self._applied_paused:
            await stream.resume(conn, self.job_id)
            await self.reporter.event("Normal", "Resumed", f"retrying after I/O error ({job.io_status})")
        self._applied_paused = spec.paused
        job = await stream.progress(conn, self.job_id)
        if initial:
            # Right after the Running write: only a phase change (e.g. re-attached to a paused
            # job) is worth a write now; progress waits its turn.
            await self._on_progress(job)
        else:
            # A spec edit: show its effect (bandwidth, phase, observedGeneration) at once.
            await self.reporter.transition(self._running_view(job))

    async def _on_progress(self, job: stream.Progress) -> None:
        self.metrics.progress(self.state.ref, job.offset, job.length)
        view = self._running_view(job)
        if view.phase != self.reporter.status.get("phase"):
            await self.reporter.transition(view)
        else:
            await self.reporter.progress(view)

    def _running_view(self, job: stream.Progress) -> st.StatusView:
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

    async def _cancel_and_finish(
        self, conn: QMPConnection, waiter: asyncio.Task[stream.Outcome], *, reason: str | None
    ) -> None:
        """Cancel the job and wait (bounded) for QEMU to confirm how it ended."""
        self.finishing = True
        await stream.cancel(conn, self.job_id)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(waiter), self.settings.delete_timeout)
        except TimeoutError:
            self.abort_outcome = "timeout"
            await self.reporter.event(
                "Warning",
                "CancelTimeout",
                f"QEMU did not confirm the cancel within {self.settings.delete_timeout:g}s",
            )
            return
        if reason is None:  # deletion: record what really happened, then let the object go
            self.abort_outcome = outcome.result.value
            if outcome.result is stream.Result.CANCELLED:
                self._metrics_outcome(JobResult.CANCELLED, outcome)
                await self.reporter.event(
                    "Normal",
                    "Cancelled",
                    f"cancelled QEMU job {self.job_id} at {_percent(outcome)}; chain intact",
                )
                await self._dismiss(conn)
            else:
                await self._finish(conn, outcome)
            return
        if outcome.result is stream.Result.COMPLETED:  # the job won the race with the deadline
            await self._finish(conn, outcome)
            return
        await self._fail(
            reason,
            f"activeDeadlineSeconds={self.state.spec.active_deadline_seconds} exceeded; job cancelled "
            f"at {_percent(outcome)}, chain intact",
            outcome,
        )
        await self._dismiss(conn)

    async def _finish(self, conn: QMPConnection, outcome: stream.Outcome) -> None:
        self.finishing = True
        if outcome.result is stream.Result.COMPLETED:
            await self._flush(conn)
            await self._complete(outcome, _UNWATCHED if self._ended_unwatched else None)
        elif outcome.result is stream.Result.FAILED:
            note = f" ({_UNWATCHED})" if self._ended_unwatched else ""
            await self._fail("IOError", (outcome.error or "the job failed") + note, outcome)
        else:
            await self._fail(
                "Cancelled", "the QEMU job was cancelled outside BlockPull; chain intact", outcome
            )
        await self._dismiss(conn)

    async def _flush(self, conn: QMPConnection) -> None:
        # QEMU 7.2 may hold the copied clusters' metadata in its cache after completion; a
        # SIGKILL then would lose them. Flush before telling anyone the pull is done.
        node = (self.reporter.status.get("target") or {}).get("node")
        if not node:
            return
        try:
            await stream.flush_disk(conn, str(node))
        except BlockPullError as exc:
            log.warning("%s: flushing %s after completion failed: %s", self.state.ref, node, exc)

    async def _dismiss(self, conn: QMPConnection) -> None:
        # Only now that the outcome is in .status may QEMU forget the job.
        with contextlib.suppress(JobNotFound, Disconnected):
            await stream.dismiss(conn, self.job_id)

    async def _complete(self, outcome: stream.Outcome | None, note: str | None) -> None:
        released = self._released()
        length = outcome.length if outcome else int(self.reporter.status.get("length") or 0)
        message = f"streamed {format_bytes(length)} from {len(released)} backing image(s)"
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
        self._metrics_outcome(JobResult.COMPLETED, outcome)
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

    async def _fail(self, reason: str, message: str, outcome: stream.Outcome | None = None) -> None:
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
        self._metrics_outcome(JobResult.CANCELLED if reason == "Cancelled" else JobResult.FAILED, outcome)
        await self.reporter.event("Warning", "Failed", f"{reason}: {message}")

    async def _pending(self, reason: str, message: str) -> None:
        self.metrics.pending(self.state.ref, reason)
        status = self.reporter.status
        if (
            status.get("phase") == st.PENDING
            and status.get("reason") == reason
            and status.get("message") == message
            and status.get("observedGeneration") == self.state.generation
        ):
            return
        await self.reporter.transition(st.StatusView(phase=st.PENDING, reason=reason, message=message))

    # --- metrics ------------------------------------------------------------------------------

    def _metrics_reattached(self, job: stream.Progress) -> None:
        started = st.parse_time(self.reporter.status.get("startTime"))
        self.metrics.job_started(
            self.state.ref, offset=job.offset, started_at=started.timestamp() if started else None
        )

    def _metrics_outcome(self, result: JobResult, outcome: stream.Outcome | None) -> None:
        if outcome is not None:
            self.metrics.progress(self.state.ref, outcome.offset, outcome.length)
        self.metrics.job_finished(self.state.ref, result)

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


def _chain_entries(chain: DiskChain) -> list[dict[str, str]]:
    return [{"node": image.node_name, "file": image.filename} for image in chain.images]


def _rate(bandwidth: int) -> str:
    return "unlimited" if bandwidth == 0 else f"{format_bytes(bandwidth)}/s"


def _percent(outcome: stream.Outcome) -> str:
    return st.progress_text(outcome.offset, outcome.length)
