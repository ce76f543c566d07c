"""How a runner's job ends: concluded durably, cancelled and confirmed, or found vanished
(and a lost job judged from the disk's chain: done, or to be started again).

Owns: the three ends of a job the runner followed, each through the protocol sequences of
`blockpull.pull` (flush, finalize, flush, record, dismiss), and what they leave for the
runner and its manager to read: whether the end is under way (`finishing`: a shutdown lets
it finish) and how a deletion's cancel ended (`abort_outcome`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from blockpull import pull as protocol
from blockpull.agent.kube import ObjectRef
from blockpull.agent.outcomes import OutcomeWriter
from blockpull.agent.record import PullRecord
from blockpull.agent.reporter import Reporter
from blockpull.agent.settings import AgentSettings
from blockpull.agent.spec import PullSpec
from blockpull.driver import BlockJobDriver, Outcome

log = logging.getLogger(__name__)


class JobEnding:
    def __init__(
        self,
        ref: ObjectRef,
        job_id: str,
        settings: AgentSettings,
        reporter: Reporter,
        outcomes: OutcomeWriter,
        *,
        record: Callable[[], PullRecord],
        spec: Callable[[], PullSpec],
    ) -> None:
        self._ref = ref
        self._job_id = job_id
        self._settings = settings
        self._reporter = reporter
        self._outcomes = outcomes
        self._record = record
        self._spec = spec
        #: The job has ended and its outcome is being written and the job dismissed: a
        #: shutdown lets this finish (briefly) rather than leave a concluded job in QEMU.
        self.finishing = False
        #: How a deletion's cancel ended (a Result value, or "timeout"); None: not confirmed.
        self.abort_outcome: str | None = None
        #: Re-attached to a job that had already concluded (nobody saw it end).
        self.unwatched = False

    async def finish(self, driver: BlockJobDriver) -> None:
        """The job has ended: finalize it durably, record its outcome, dismiss it."""
        self.finishing = True

        async def record(outcome: Outcome) -> None:
            await self._outcomes.job_ended(outcome, unwatched=self.unwatched)

        await protocol.conclude(driver, self._job_id, self._record().device, record=record)

    async def cancel(self, driver: BlockJobDriver, *, reason: str | None) -> None:
        """Cancel the job (a deletion: `reason` None; or a deadline), wait (bounded) for the
        hypervisor to confirm how it ended, and record that."""
        self.finishing = True
        log.info("%s: cancelling job %s (%s)", self._ref, self._job_id, reason or "deleted")
        timeout = self._settings.delete_timeout
        ended = await protocol.cancel_and_confirm(
            driver, self._job_id, timeout=timeout, poll_interval=self._settings.poll_interval
        )
        if ended is None:
            self.abort_outcome = "timeout"
            message = f"QEMU did not confirm the cancel of job {self._job_id} within {timeout:g}s"
            log.warning("%s: %s", self._ref, message)
            await self._reporter.event("Warning", "CancelTimeout", message)
            return

        async def record(outcome: Outcome) -> None:
            if reason is None:
                self.abort_outcome = outcome.result.value
            await self._outcomes.cancel_confirmed(
                outcome,
                deadline=None if reason is None else self._spec().active_deadline_seconds,
                unwatched=self.unwatched,
            )

        await protocol.conclude(driver, self._job_id, self._record().device, record=record)

    async def vanished(self, driver: BlockJobDriver) -> None:
        """Our job disappeared from a QEMU that is still there: someone else dismissed it."""
        self.finishing = True
        spec = self._spec()
        if await driver.pulled(spec.disk, self._record().base_node or spec.base):
            await driver.make_durable(self._record().device)
            await self._outcomes.completed(None, "the job was dismissed outside BlockPull after it completed")
            return
        await self._outcomes.failed(
            "Cancelled", "the QEMU job disappeared (cancelled and dismissed outside BlockPull); chain intact"
        )

    async def restart_lost(self, driver: BlockJobDriver) -> bool:
        """The VM no longer knows the job we started (dismissed by someone else, or QEMU
        restarted): the disk's chain says whether the pull is done. True: start it again."""
        spec = self._spec()
        if await driver.pulled(spec.disk, self._record().base_node or spec.base):
            await self._outcomes.completed(None, "the pull finished while the agent was away")
            return False
        await self._reporter.event(
            "Warning",
            "Restarted",
            "QEMU no longer knows the job and the disk still needs its backing images (QEMU "
            "restarted?); starting the pull again",
        )
        return True

    async def warn_if_unconfirmed(self, trouble: str | None) -> None:
        """Deleted while QEMU could not be asked to cancel a job we had started: say so."""
        if self.abort_outcome is not None or self._record().start_time is None:
            return  # QEMU confirmed (or timed out, already reported), or no job was ever started
        message = (
            f"deleted while QEMU could not be reached ({trouble or 'no answer'}); the finalizer "
            f"is removed without QEMU confirming that job {self._job_id} is cancelled"
        )
        log.warning("%s: %s", self._ref, message)
        await self._reporter.event("Warning", "AbortUnconfirmed", message)
