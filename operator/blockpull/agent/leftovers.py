"""Jobs in QEMU whose object has no runner in this agent, seen through to their end.

Owns: a finished object's concluded job left behind by a killed agent (dismissed once per
agent run), the job of an object deleted while no runner followed it (cancelled, confirmed,
dismissed), and an ended job of this agent whose object is gone (collected, so that it never
holds a disk). Every end goes through `blockpull.pull`, like a runner's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from blockpull import pull as protocol
from blockpull.agent.kube import KubeAPI, ObjectRef
from blockpull.agent.metrics import AgentMetrics, JobResult
from blockpull.agent.record import job_id_for, uid_of_job
from blockpull.agent.settings import AgentSettings
from blockpull.agent.spec import PullSpec
from blockpull.agent.vms import VMs
from blockpull.driver import BlockJobDriver, Outcome, Progress
from blockpull.errors import BlockPullError

log = logging.getLogger(__name__)


class Leftovers:
    def __init__(
        self,
        settings: AgentSettings,
        kube: KubeAPI,
        vms: VMs,
        metrics: AgentMetrics,
        *,
        handled: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.vms = vms
        self.metrics = metrics
        #: True for a uid this agent has a runner for, or whose outcome it wrote.
        self._handled = handled
        self._swept: set[str] = set()  # finished objects checked for a leftover QEMU job
        self._background: set[asyncio.Task[None]] = set()

    def forget(self, uid: str) -> None:
        self._swept.discard(uid)

    def sweep_once(self, ref: ObjectRef, body: Mapping[str, Any]) -> None:
        """Once per agent run, dismiss a finished object's job left concluded in QEMU.

        The outcome is written before the job is dismissed; an agent killed in between leaves
        a concluded job behind, which nothing else would ever remove.
        """
        if ref.uid in self._swept or self._handled(ref.uid):
            return  # checked already, or this agent's own runner wrote the outcome and dismissed
        self._swept.add(ref.uid)
        job_id = (body.get("status") or {}).get("jobId")
        if job_id:
            task = asyncio.ensure_future(self._dismiss_leftover(ref, body, str(job_id)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

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
        if uid is None or self._handled(uid):
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

    async def abort(self, ref: ObjectRef, body: Mapping[str, Any]) -> None:
        """A deleted object without a runner (the agent restarted meanwhile): cancel its job."""
        status = body.get("status") or {}
        try:
            vm = PullSpec.from_spec(body.get("spec", {})).vm
        except BlockPullError:
            return  # a spec that never reached a VM
        await self.abort_job(ref, vm, str(status.get("jobId") or job_id_for(ref.uid)))

    async def abort_job(self, ref: ObjectRef, vm: str, job_id: str) -> None:
        """Cancel (and confirm, and dismiss) `job_id` on `vm` for an object that is gone or
        going: a deletion asked for an abort. Ends with a Warning when QEMU cannot confirm."""
        try:
            driver = await self.vms.driver_for(ref.namespace, vm)
            job = await driver.find_job(job_id)
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
                if not job.concluded:
                    self.metrics.job_finished(ref, JobResult.CANCELLED)
                message = f"cancelled QEMU job {job_id} ({outcome.result.value}); chain intact"
                log.info("%s: %s", ref, message)
                await self.kube.post_event(ref, "Normal", "Cancelled", message)

            await protocol.conclude(driver, job_id, None, record=record)
        except BlockPullError as exc:
            await self._warn(
                ref,
                "AbortUnconfirmed",
                f"could not confirm the abort with QEMU ({exc}); removing the finalizer",
            )

    async def _warn(self, ref: ObjectRef, reason: str, message: str) -> None:
        log.warning("%s: %s", ref, message)
        await self.kube.post_event(ref, "Warning", reason, message)
