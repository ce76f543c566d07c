"""Writing how one pull ended: the status, the Event, the log line and the metrics, together.

Owns: turning an outcome (the job's own, a failure the agent decided, a deletion's cancel)
into everything that tells it, so that no path forgets one of them. The order is the
contract's: the status first (it is the record that survives), then the Event and metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from blockpull.agent import status as st
from blockpull.agent import views
from blockpull.agent.clock import WallClock, utc_now
from blockpull.agent.kube import ObjectRef
from blockpull.agent.metrics import AgentMetrics, JobResult
from blockpull.agent.record import PullRecord
from blockpull.agent.reporter import Reporter
from blockpull.driver import Outcome, Result
from blockpull.errors import DeadlineExceeded

log = logging.getLogger(__name__)


class OutcomeWriter:
    def __init__(
        self,
        ref: ObjectRef,
        reporter: Reporter,
        metrics: AgentMetrics,
        record: Callable[[], PullRecord],
        clock: WallClock = utc_now,
    ) -> None:
        self._ref = ref
        self._clock = clock
        self._reporter = reporter
        self._metrics = metrics
        self._record = record

    async def job_ended(self, outcome: Outcome, *, unwatched: bool) -> None:
        """The job's own outcome, as the hypervisor recorded it."""
        note = views.UNWATCHED if unwatched else None
        if outcome.result is Result.COMPLETED:
            await self.completed(outcome, note)
        elif outcome.result is Result.FAILED:
            suffix = f" ({note})" if note else ""
            await self.failed("IOError", (outcome.error or "the job failed") + suffix, outcome)
        else:
            await self.failed(
                "Cancelled", "the QEMU job was cancelled outside BlockPull; chain intact", outcome
            )

    async def completed(self, outcome: Outcome | None, note: str | None) -> None:
        view = views.completed(self._record(), outcome, note, st.now_rfc3339(self._clock()))
        await self._reporter.transition(view)
        self._count(JobResult.COMPLETED, outcome)
        await self._reporter.event("Normal", "Completed", view.message)

    async def failed(self, reason: str, message: str, outcome: Outcome | None = None) -> None:
        await self._reporter.transition(views.failed(reason, message, outcome, st.now_rfc3339(self._clock())))
        self._count(JobResult.CANCELLED if reason == "Cancelled" else JobResult.FAILED, outcome)
        await self._reporter.event("Warning", "Failed", f"{reason}: {message}")

    async def cancel_confirmed(self, outcome: Outcome, *, deadline: int | None, unwatched: bool) -> None:
        """How a job we cancelled ended: for a deletion (`deadline` None) an Event and a count
        (no status: the object goes); for `activeDeadlineSeconds`, Failed/DeadlineExceeded. A job
        that had ended before the cancel arrived gets its own outcome."""
        if outcome.result is not Result.CANCELLED:
            await self.job_ended(outcome, unwatched=unwatched)
        elif deadline is None:
            self._count(JobResult.CANCELLED, outcome)
            message = f"cancelled QEMU job {outcome.job_id} at {views.percent(outcome)}; chain intact"
            log.info("%s: %s", self._ref, message)
            await self._reporter.event("Normal", "Cancelled", message)
        else:
            await self.failed(
                DeadlineExceeded.reason,
                f"activeDeadlineSeconds={deadline} exceeded; job cancelled at {views.percent(outcome)}, "
                "chain intact",
                outcome,
            )

    def _count(self, result: JobResult, outcome: Outcome | None) -> None:
        if outcome is not None:
            self._metrics.progress(self._ref, outcome.offset, outcome.length)
        self._metrics.job_finished(self._ref, result)
