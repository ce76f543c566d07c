"""All BlockPulls of this node: one supervised runner per unfinished object, TTL timers.

Owns: mapping Kubernetes observations (an object seen, changed, deleted) onto runners; the
runners' tasks and their restart after API trouble; deleting finished objects after
`ttlSecondsAfterFinished`; and an orderly shutdown that leaves QEMU jobs running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from blockpull.agent import status as st
from blockpull.agent import views
from blockpull.agent.clock import WallClock, utc_now
from blockpull.agent.kube import Gone, KubeAPI, KubeAPIError, ObjectRef
from blockpull.agent.leftovers import Leftovers
from blockpull.agent.metrics import AgentMetrics, JobResult
from blockpull.agent.record import PullRecord
from blockpull.agent.reporter import ObjectReporter
from blockpull.agent.runner import ObjectState, PullRunner
from blockpull.agent.scheduler import NodeScheduler
from blockpull.agent.scheduling import QueueKey
from blockpull.agent.settings import AgentSettings
from blockpull.agent.spec import PullSpec
from blockpull.agent.ttl import TTLTimers
from blockpull.agent.vms import VMs
from blockpull.errors import BlockPullError, InvalidSpec

log = logging.getLogger(__name__)

#: How long a shutdown waits for runners that are writing an outcome and dismissing the job.
SHUTDOWN_GRACE = 3.0


def _log_changed(ref: ObjectRef, problem: str, last: str, backoff: float) -> str:
    """A runner's retried problem: WARNING when it is new, DEBUG while it repeats (an object
    waiting for hours must not write the same line every few seconds)."""
    level = logging.DEBUG if problem == last else logging.WARNING
    log.log(level, "%s: %s in %.0fs", ref, problem, backoff)
    return problem


def queue_of(objects: Sequence[Mapping[str, Any]], node: str) -> tuple[list[str], list[tuple[str, QueueKey]]]:
    """From a full list: the uids with a job in QEMU, and the keys of those that wait for one
    (unfinished, not deleted, not paused, with a valid spec)."""
    running: list[str] = []
    waiting: list[tuple[str, QueueKey]] = []
    for body in objects:
        meta = body.get("metadata", {})
        record = PullRecord.parse(body.get("status"))
        if meta.get("deletionTimestamp") or record.terminal or body.get("spec", {}).get("nodeName") != node:
            continue
        ref = ObjectRef.of(body)
        if record.started:
            running.append(ref.uid)
            continue
        try:
            spec = PullSpec.from_spec(body.get("spec", {}))
        except InvalidSpec:
            continue
        created = st.parse_time(meta.get("creationTimestamp"))
        if not spec.paused and created is not None:
            waiting.append((ref.uid, QueueKey(created, ref.namespace, ref.name)))
    return running, waiting


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        kube: KubeAPI,
        vms: VMs,
        metrics: AgentMetrics | None = None,
        *,
        clock: WallClock = utc_now,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.vms = vms
        self.metrics = metrics or AgentMetrics(settings.node_name)
        self._observed: dict[str, int] = {}  # finished objects: the generation last written
        self._runners: dict[str, tuple[PullRunner, asyncio.Task[None]]] = {}
        #: The wall clock of every timestamp, deadline and TTL (controlled time in tests).
        self.clock = clock
        self._ttl = TTLTimers(kube, clock)
        self._background: set[asyncio.Task[Any]] = set()
        self._finished: set[str] = set()  # uids whose outcome this agent wrote
        self._refused: set[str] = set()  # uids being failed for an invalid spec
        self.scheduler = NodeScheduler(limit=settings.max_concurrent, budget=settings.node_bandwidth)
        self._leftovers = Leftovers(
            settings,
            kube,
            vms,
            self.metrics,
            handled=lambda uid: uid in self._runners or uid in self._finished,
        )

    # --- start ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Before the first slot is granted (with a limit), see the node's full list of
        objects: the ones with a job in QEMU keep their slots (they are re-attached first), the
        others queue in creation order, whichever of them the watch happens to deliver first."""
        if self.scheduler.is_open:
            return
        backoff = 1.0
        while True:
            try:
                objects = await self.kube.node_objects(self.settings.watch_namespace)
                break
            except KubeAPIError as exc:
                log.warning("could not list this node's BlockPulls to rebuild the queue (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        running, waiting = queue_of(objects, self.settings.node_name)
        self.scheduler.expect(waiting, running)
        self.scheduler.open()
        log.info(
            "node slots: %d in use by running jobs, %d objects queued (BLOCKPULL_MAX_CONCURRENT=%d)",
            self.scheduler.holders,
            self.scheduler.waiting,
            self.settings.max_concurrent,
        )

    # --- observations -------------------------------------------------------------------------

    def observe(self, body: Mapping[str, Any]) -> None:
        """Called for every watch event of an object of this node; idempotent and cheap."""
        meta = body.get("metadata", {})
        if meta.get("deletionTimestamp"):
            return  # deletion is handled by `delete`
        if body.get("spec", {}).get("nodeName") != self.settings.node_name:
            return  # never act on another node's object (the watch is filtered too)
        ref = ObjectRef.of(body)
        status = body.get("status") or {}
        if ref.uid in self._finished and not st.is_terminal(status):
            # A watch event older than the outcome we wrote (kopf may deliver it after the
            # runner ended): the object is finished, whatever this stale body says.
            return
        if st.is_terminal(status):
            self._ttl.schedule(ref, body)
            self._leftovers.sweep_once(ref, body)
            self._observe_finished(ref, body)
            return
        generation = int(meta.get("generation", 1))
        running = self._runners.get(ref.uid)
        try:
            spec = PullSpec.from_spec(body.get("spec", {}))
        except InvalidSpec as exc:
            if running is None:
                if ref.uid not in self._refused:
                    self._refused.add(ref.uid)
                    self._spawn(self._refuse(ref, status, generation, exc))
            else:
                # Keep following the running job with the last valid spec; say so once per
                # generation (every status write brings the same body back through the watch).
                running[0].reject(generation, exc.message)
            return
        if running is not None:
            runner = running[0]
            # A new generation with an equal spec (say bandwidth `1Mi` rewritten as 1048576) must
            # still reach status.observedGeneration, or kstatus reads the object InProgress for good.
            if spec != runner.state.spec or generation != runner.state.generation:
                runner.update(spec, generation)
            return
        self._start(ref, spec, status=status, generation=generation, meta=meta)

    def _start(
        self,
        ref: ObjectRef,
        spec: PullSpec,
        *,
        status: Mapping[str, Any],
        generation: int,
        meta: Mapping[str, Any],
    ) -> None:
        created = st.parse_time(meta.get("creationTimestamp")) or self.clock()
        state = ObjectState(ref=ref, spec=spec, generation=generation, created=created)
        # The runner's updates move the generation forward.
        reporter = self._reporter(ref, status, lambda: state.generation)
        runner = PullRunner(
            state,
            reporter,
            self.vms,
            self.settings,
            metrics=self.metrics,
            scheduler=self.scheduler,
            clock=self.clock,
        )
        runner.collect_orphan = lambda driver, job: self._leftovers.collect_orphan(ref, driver, job)
        task = asyncio.create_task(self._supervise(runner), name=f"blockpull:{ref}")
        self._runners[ref.uid] = (runner, task)

    def _reporter(
        self, ref: ObjectRef, status: Mapping[str, Any], generation: Callable[[], int]
    ) -> ObjectReporter:
        return ObjectReporter(
            self.kube,
            ref,
            node_name=self.settings.node_name,
            interval=self.settings.status_interval,
            status=status,
            generation=generation,
            now=self.clock,
        )

    async def _refuse(
        self, ref: ObjectRef, status: Mapping[str, Any], generation: int, exc: InvalidSpec
    ) -> None:
        """An object whose spec can never be served as written: Failed/InvalidSpec at once,
        with no runner (nothing is ever sent to a VM for it)."""
        reporter = self._reporter(ref, status, lambda: generation)
        try:
            await reporter.transition(
                views.failed(exc.reason, exc.message, None, st.now_rfc3339(self.clock()))
            )
        except KubeAPIError as problem:
            self._refused.discard(ref.uid)  # tried again at the object's next watch event
            log.warning("%s: could not record the invalid spec (%s)", ref, problem)
            return
        self._finished.add(ref.uid)
        self.scheduler.release(ref.uid)  # it may have been queued from a restart's list
        self.metrics.job_finished(ref, JobResult.FAILED)
        await reporter.event("Warning", "Failed", f"{exc.reason}: {exc.message}")

    async def _supervise(self, runner: PullRunner) -> None:
        ref = runner.state.ref
        backoff = 1.0
        last_problem = ""
        try:
            while True:
                try:
                    await runner.run()
                    return
                except Gone:
                    await self._gone(runner)
                    return
                except BlockPullError as exc:
                    trouble = "Kubernetes API trouble: " if isinstance(exc, KubeAPIError) else ""
                    last_problem = _log_changed(ref, f"{trouble}{exc}; retrying", last_problem, backoff)
                except Exception:
                    log.exception("%s: unexpected error; retrying in %.0fs", ref, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        except Gone:
            return
        finally:
            # The runner is done: its job (if any) has ended, or it was stopped by a shutdown
            # (which grants nothing more). Its slot and bandwidth share go to the next objects.
            self._runners.pop(ref.uid, None)
            self.scheduler.release(ref.uid)
            self.metrics.forget(ref.uid)
            if st.is_terminal(runner.reporter.status):
                self._finished.add(ref.uid)

    async def _gone(self, runner: PullRunner) -> None:
        """The object went away without the finalizer's abort: deleted in the moment before
        kopf's finalizer landed, or replaced by a new object of its name. A job the runner had
        in QEMU would run on unobserved and then hold the disk: cancel it, as a delete does."""
        if runner.has_job and not runner.record.terminal:
            log.warning("%s: the object is gone; cancelling its job %s", runner.state.ref, runner.job_id)
            await self._leftovers.abort_job(runner.state.ref, runner.state.spec.vm, runner.job_id)

    def _observe_finished(self, ref: ObjectRef, body: Mapping[str, Any]) -> None:
        """A spec edit of a finished object (from Git, say) is observed: observedGeneration and
        the conditions' catch up; nothing restarts, the outcome and its times stay."""
        generation = int(body.get("metadata", {}).get("generation", 1))
        if self._observed.get(ref.uid) == generation:
            return  # written already (this event may be the echo of that write)
        patch = st.observe_generation(body.get("status") or {}, generation)
        if patch is None:
            return
        self._observed[ref.uid] = generation
        self._spawn(self._write_observed(ref, patch, generation))

    async def _write_observed(self, ref: ObjectRef, patch: Mapping[str, Any], generation: int) -> None:
        try:
            await self.kube.patch_status(ref, patch, urgent=False)
        except Gone:
            pass
        except KubeAPIError as exc:
            log.warning("%s: could not record observedGeneration %d: %s", ref, generation, exc)
            if self._observed.get(ref.uid) == generation:
                del self._observed[ref.uid]  # the next event of the object tries again

    def forget(self, uid: str) -> None:
        """The object is gone from the API: drop what was kept about it."""
        self._finished.discard(uid)
        self._refused.discard(uid)
        self._leftovers.forget(uid)
        self._observed.pop(uid, None)
        self.metrics.forget(uid)
        self._ttl.cancel(uid)
        entry = self._runners.get(uid)
        if entry is None:
            self.scheduler.release(uid)
        else:
            # Gone without the finalizer's abort (see `_gone`): the runner cancels its job.
            entry[0].request_abort()

    # --- deletion -----------------------------------------------------------------------------

    async def delete(self, body: Mapping[str, Any]) -> None:
        """Abort the pull of a deleted object; returns once QEMU confirmed, or after a bound."""
        ref = ObjectRef.of(body)
        self._ttl.cancel(ref.uid)
        entry = self._runners.get(ref.uid)
        if entry is not None:
            runner, task = entry
            runner.request_abort()
            try:
                async with asyncio.timeout(self.settings.delete_timeout + 5):
                    await asyncio.shield(task)
            except TimeoutError:
                await self._warn(
                    ref, "AbortTimeout", "the runner did not stop in time; removing the finalizer"
                )
            return
        # No runner (the agent restarted and the object was deleted meanwhile): cancel directly.
        self.scheduler.release(ref.uid)  # it may have been queued from a restart's list
        await self._leftovers.abort(ref, body)

    # --- helpers ------------------------------------------------------------------------------

    async def _event(self, ref: ObjectRef, kind: str, reason: str, message: str) -> None:
        await self.kube.post_event(ref, kind, reason, message)

    async def _warn(self, ref: ObjectRef, reason: str, message: str) -> None:
        log.warning("%s: %s", ref, message)
        await self._event(ref, "Warning", reason, message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def active(self) -> int:
        return len(self._runners)

    async def shutdown(self) -> None:
        """Stop following jobs (QEMU keeps running them) and close connections.

        Runners already finishing (outcome being written, job being dismissed) get a moment to
        end: cancelling them there would leave a concluded job in QEMU for the next start.
        """
        self.scheduler.close()
        finishing = [task for runner, task in self._runners.values() if runner.finishing]
        if finishing:
            await asyncio.wait(finishing, timeout=SHUTDOWN_GRACE)
        await self._ttl.close()
        tasks = [task for _, task in self._runners.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.vms.close_all()
