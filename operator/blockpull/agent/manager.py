"""All BlockPulls of this node: one supervised runner per unfinished object, TTL timers.

Owns: mapping Kubernetes observations (an object seen, changed, deleted) onto runners; the
runners' tasks and their restart after API trouble; deleting finished objects after
`ttlSecondsAfterFinished`; and an orderly shutdown that leaves QEMU jobs running.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
from collections.abc import Mapping
from typing import Any

from blockpull import pull as protocol
from blockpull.agent import status as st
from blockpull.agent.kube import Gone, KubeAPI, KubeAPIError, ObjectRef
from blockpull.agent.reporter import ObjectReporter
from blockpull.agent.runner import ObjectState, PullRunner, job_id_for
from blockpull.agent.settings import AgentSettings
from blockpull.agent.spec import PullSpec
from blockpull.agent.vms import VMs
from blockpull.driver import BlockJobDriver, Outcome, Progress
from blockpull.errors import BlockPullError, InvalidSpec

log = logging.getLogger(__name__)

#: How long a shutdown waits for runners that are writing an outcome and dismissing the job.
SHUTDOWN_GRACE = 3.0
_UID_JOB = re.compile(r"^blockpull-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def uid_of_job(job_id: str) -> str | None:
    """The object uid a job id of this agent's was derived from (`job_id_for`), if it is one."""
    match = _UID_JOB.match(job_id)
    return match[1] if match else None


class Agent:
    def __init__(self, settings: AgentSettings, kube: KubeAPI, vms: VMs) -> None:
        self.settings = settings
        self.kube = kube
        self.vms = vms
        self._runners: dict[str, tuple[PullRunner, asyncio.Task[None]]] = {}
        self._ttl: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._swept: set[str] = set()  # finished objects checked for a leftover QEMU job
        self._finished: set[str] = set()  # uids whose outcome this agent wrote

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
            self._schedule_ttl(ref, body)
            self._sweep_once(ref, body)
            return
        generation = int(meta.get("generation", 1))
        running = self._runners.get(ref.uid)
        try:
            spec = PullSpec.from_spec(body.get("spec", {}))
        except InvalidSpec as exc:
            if running is None:
                self._start(ref, None, status=status, generation=generation, meta=meta, invalid=exc)
            elif generation != running[0].state.generation:
                # Keep following the running job with the last valid spec.
                self._spawn(running[0].reporter.event("Warning", "InvalidSpec", exc.message))
            return
        if running is not None:
            runner = running[0]
            if spec != runner.state.spec:
                runner.update(spec, generation)
            return
        self._start(ref, spec, status=status, generation=generation, meta=meta)

    def _start(
        self,
        ref: ObjectRef,
        spec: PullSpec | None,
        *,
        status: Mapping[str, Any],
        generation: int,
        meta: Mapping[str, Any],
        invalid: InvalidSpec | None = None,
    ) -> None:
        created = st.parse_time(meta.get("creationTimestamp")) or datetime.datetime.now(datetime.UTC)
        placeholder = spec or PullSpec(node_name=self.settings.node_name, vm="invalid", disk="invalid")
        state = ObjectState(ref=ref, spec=placeholder, generation=generation, created=created)
        reporter = ObjectReporter(
            self.kube,
            ref,
            node_name=self.settings.node_name,
            interval=self.settings.status_interval,
            status=status,
            generation=lambda: state.generation,  # the runner's updates move it forward
        )
        runner = PullRunner(state, reporter, self.vms, self.settings)
        runner.collect_orphan = lambda driver, job: self.collect_orphan(ref, driver, job)
        task = asyncio.create_task(self._supervise(runner, invalid), name=f"blockpull:{ref}")
        self._runners[ref.uid] = (runner, task)

    async def _supervise(self, runner: PullRunner, invalid: InvalidSpec | None) -> None:
        ref = runner.state.ref
        backoff = 1.0
        try:
            if invalid is not None:
                await runner._fail(invalid.reason, invalid.message)
                return
            while True:
                try:
                    await runner.run()
                    return
                except Gone:
                    return
                except KubeAPIError as exc:
                    log.warning("%s: Kubernetes API trouble (%s); retrying in %.0fs", ref, exc, backoff)
                except BlockPullError as exc:
                    log.warning("%s: %s; retrying in %.0fs", ref, exc, backoff)
                except Exception:
                    log.exception("%s: unexpected error; retrying in %.0fs", ref, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        except Gone:
            return
        finally:
            self._runners.pop(ref.uid, None)
            if st.is_terminal(runner.reporter.status):
                self._finished.add(ref.uid)

    def _sweep_once(self, ref: ObjectRef, body: Mapping[str, Any]) -> None:
        """Once per agent run, dismiss a finished object's job left concluded in QEMU.

        The outcome is written before the job is dismissed; an agent killed in between leaves
        a concluded job behind, which nothing else would ever remove.
        """
        if ref.uid in self._swept or ref.uid in self._runners or ref.uid in self._finished:
            return  # checked already, or this agent's own runner wrote the outcome and dismissed
        self._swept.add(ref.uid)
        job_id = (body.get("status") or {}).get("jobId")
        if job_id:
            self._spawn(self._dismiss_leftover(ref, body, str(job_id)))

    async def _dismiss_leftover(self, ref: ObjectRef, body: Mapping[str, Any], job_id: str) -> None:
        try:
            # VMNotFound: the VM is gone, and its jobs with it.
            driver, job = await self._find_job(ref, body, job_id)
            if job is not None and job.concluded:
                await driver.dismiss(job_id)
                log.info("%s: dismissed concluded job %s left from an earlier run", ref, job_id)
        except BlockPullError as exc:
            log.debug("%s: no leftover job check (%s)", ref, exc)

    async def _find_job(
        self, ref: ObjectRef, body: Mapping[str, Any], job_id: str
    ) -> tuple[BlockJobDriver, Progress | None]:
        """The object's VM driver and its job there, for objects without a runner."""
        spec = PullSpec.from_spec(body.get("spec", {}))
        driver = await self.vms.driver_for(ref.namespace, spec.vm)
        return driver, await driver.find_job(job_id)

    async def collect_orphan(self, ref: ObjectRef, driver: BlockJobDriver, job: Progress) -> bool:
        """Collect an ended job of this agent whose BlockPull is gone; True when collected.

        Its id is derived from a uid (`blockpull-<uid>`); no object of the namespace has that
        uid any more (it was deleted while QEMU could not confirm the abort, or its agent was
        killed in between). The deletion asked for an abort, so a job held at `pending` is
        cancelled (the chain stays as it was), and the job is dismissed.
        """
        uid = uid_of_job(job.job_id)
        if uid is None or uid in self._runners or uid in self._finished:
            return False
        if uid in await self.kube.object_uids(ref.namespace):
            return False  # its object still exists: that object's runner or sweep finishes it
        if job.pending:
            await protocol.cancel_and_confirm(
                driver,
                job.job_id,
                timeout=self.settings.delete_timeout,
                poll_interval=self.settings.poll_interval,
            )

        async def record(outcome: Outcome) -> None:
            log.info(
                "%s: collected job %s of a deleted BlockPull (%s); chain as QEMU left it",
                ref,
                job.job_id,
                outcome.result.value,
            )

        await protocol.conclude(driver, job.job_id, None, record=record)
        return True

    def forget(self, uid: str) -> None:
        """The object is gone from the API: drop what was kept about it."""
        self._finished.discard(uid)
        self._swept.discard(uid)
        self._cancel_ttl(uid)

    # --- deletion -----------------------------------------------------------------------------

    async def delete(self, body: Mapping[str, Any]) -> None:
        """Abort the pull of a deleted object; returns once QEMU confirmed, or after a bound."""
        ref = ObjectRef.of(body)
        self._cancel_ttl(ref.uid)
        entry = self._runners.get(ref.uid)
        if entry is not None:
            runner, task = entry
            runner.request_abort()
            try:
                await asyncio.wait_for(asyncio.shield(task), self.settings.delete_timeout + 5)
            except TimeoutError:
                await self._warn(
                    ref, "AbortTimeout", "the runner did not stop in time; removing the finalizer"
                )
            return
        # No runner (the agent restarted and the object was deleted meanwhile): cancel directly.
        await self._abort_without_runner(ref, body)

    async def _abort_without_runner(self, ref: ObjectRef, body: Mapping[str, Any]) -> None:
        status = body.get("status") or {}
        job_id = str(status.get("jobId") or job_id_for(ref.uid))
        try:
            driver, job = await self._find_job(ref, body, job_id)
            if job is None:
                return
            ended = (
                job
                if job.concluded
                else await protocol.cancel_and_confirm(
                    driver,
                    job_id,
                    timeout=self.settings.delete_timeout,
                    poll_interval=self.settings.poll_interval,
                )
            )
            if ended is None:
                await self._warn(
                    ref,
                    "AbortUnconfirmed",
                    f"QEMU did not confirm the cancel of job {job_id} within "
                    f"{self.settings.delete_timeout:g}s; removing the finalizer",
                )
                return

            async def record(outcome: Outcome) -> None:
                message = f"cancelled QEMU job {job_id} ({outcome.result.value}); chain intact"
                log.info("%s: %s", ref, message)
                await self._event(ref, "Normal", "Cancelled", message)

            await protocol.conclude(driver, job_id, None, record=record)
        except BlockPullError as exc:
            await self._warn(
                ref,
                "AbortUnconfirmed",
                f"could not confirm the abort with QEMU ({exc}); removing the finalizer",
            )

    # --- ttl ----------------------------------------------------------------------------------

    def _schedule_ttl(self, ref: ObjectRef, body: Mapping[str, Any]) -> None:
        ttl = body.get("spec", {}).get("ttlSecondsAfterFinished")
        finished = st.parse_time((body.get("status") or {}).get("completionTime"))
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0 or finished is None:
            self._cancel_ttl(ref.uid)
            return
        due = finished + datetime.timedelta(seconds=ttl)
        key = due.isoformat()
        current = self._ttl.get(ref.uid)
        if current is not None and current[0] == key:
            return
        self._cancel_ttl(ref.uid)
        self._ttl[ref.uid] = (key, asyncio.create_task(self._delete_at(ref, due)))

    async def _delete_at(self, ref: ObjectRef, due: datetime.datetime) -> None:
        delay = (due - datetime.datetime.now(datetime.UTC)).total_seconds()
        await asyncio.sleep(max(0.0, delay))
        try:
            await self.kube.delete(ref)
            log.info("%s: deleted after ttlSecondsAfterFinished", ref)
        except Gone:
            pass
        except KubeAPIError as exc:
            log.warning("%s: TTL delete failed: %s", ref, exc)
        finally:
            self._ttl.pop(ref.uid, None)

    def _cancel_ttl(self, uid: str) -> None:
        entry = self._ttl.pop(uid, None)
        if entry is not None:
            entry[1].cancel()

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
        finishing = [task for runner, task in self._runners.values() if runner.finishing]
        if finishing:
            await asyncio.wait(finishing, timeout=SHUTDOWN_GRACE)
        tasks = [task for _, task in self._runners.values()] + [task for _, task in self._ttl.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.vms.close_all()
