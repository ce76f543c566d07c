"""The agent's Prometheus metrics: what its jobs do, per node and per object in flight.

Owns: the metric families of the contract (names, types and labels are fixed: dashboards and
alerts rely on them), their bookkeeping from the few calls the runners and the manager make,
and the HTTP endpoint that serves them. Each `AgentMetrics` has a registry of its own (not
prometheus_client's global one), so tests can make several.

Rules it keeps:
- Per-object series (`blockpull_job_progress_ratio`, `blockpull_job_remaining_bytes`) exist
  only while the object has a job in QEMU; they go when it finishes or the object goes, so
  their number stays bounded by the jobs in flight.
- `blockpull_streamed_bytes_total` counts what the agent saw QEMU stream, each byte once:
  offsets only move forward, and after a re-attach the count starts at the offset found.
- Durations are measured on the agent's monotonic clock; a job the agent re-attached to is
  dated from its `status.startTime` (wall clock), the only start it knows.
- An object deleted before its job started is not counted as finished.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import start_http_server

from blockpull.agent.views import QUEUED

if TYPE_CHECKING:  # the agent's entry point imports this before the Kubernetes client
    from blockpull.agent.kube import ObjectRef


class JobResult(enum.StrEnum):
    """The `result` label of the finished counter and the duration histogram."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: From one second (an unthrottled pull of a small disk) to about a day (a throttled multi-TiB one).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)


@dataclass
class _Job:
    namespace: str
    name: str
    started: float  # monotonic
    offset: int  # the furthest offset counted into streamed bytes


class AgentMetrics:
    """The metric families of one agent (one node), fed by its runners and manager."""

    #: Pending reasons this agent writes (a fixed set, so the label stays bounded).
    PENDING_REASONS = ("Starting", "WaitingForVM", "QEMUUnavailable", "DiskBusy", "Paused")

    def __init__(
        self, node: str, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> None:
        self.node = node
        # No `*_created` series beside each counter and histogram: in the text format they are
        # gauge families of their own, outside the contract's names, doubling the series.
        # (prometheus_client's switch is process-wide; this process is the agent.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._wall = wall
        self._jobs: dict[str, _Job] = {}
        self._pending: dict[str, str] = {}  # uid -> Pending reason
        self._declare_families()
        # Every node-labelled family has its series from the start (0), so rate() and
        # absent() work before the first job; per-result children too.
        self._active.labels(node).set(0)
        self._queued.labels(node).set(0)
        self._streamed.labels(node)
        for reason in self.PENDING_REASONS:
            self._waiting.labels(node, reason).set(0)
        for result in JobResult:
            self._finished.labels(node, result.value)
            self._duration.labels(node, result.value)

    def _declare_families(self) -> None:
        """The contract's families (and `blockpull_jobs_pending`), in this agent's registry."""
        self._active = Gauge(
            "blockpull_jobs_active",
            "BlockPulls with a job in QEMU now (running or paused)",
            ["node"],
            registry=self.registry,
        )
        self._queued = Gauge(
            "blockpull_jobs_queued",
            "BlockPulls waiting for a node slot (BLOCKPULL_MAX_CONCURRENT; Pending reason Queued)",
            ["node"],
            registry=self.registry,
        )
        # Beyond the contract's table (which stays as it is): what the "pending too long"
        # alert needs, since a Pending object has no job and so no per-object series.
        self._waiting = Gauge(
            "blockpull_jobs_pending",
            "BlockPulls Pending now (no job in QEMU), by reason; Queued ones are blockpull_jobs_queued",
            ["node", "reason"],
            registry=self.registry,
        )
        self._finished = Counter(
            "blockpull_jobs_finished",
            "BlockPulls that reached an outcome",
            ["node", "result"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "blockpull_job_duration_seconds",
            "Start to outcome of BlockPull jobs that ran in QEMU, by the agent's clock",
            ["node", "result"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._streamed = Counter(
            "blockpull_streamed_bytes",
            "Bytes QEMU has streamed for this node's jobs (job offsets, each counted once)",
            ["node"],
            registry=self.registry,
        )
        self._ratio = Gauge(
            "blockpull_job_progress_ratio",
            "Job offset/length, 0..1, only while the object has a job",
            ["namespace", "name", "node"],
            registry=self.registry,
        )
        self._remaining = Gauge(
            "blockpull_job_remaining_bytes",
            "Job length minus offset, only while the object has a job",
            ["namespace", "name", "node"],
            registry=self.registry,
        )

    # --- what runners and the manager report ----------------------------------------------

    def job_started(self, ref: ObjectRef, *, offset: int = 0, started_at: float | None = None) -> None:
        """The object has a job in QEMU: started now (offset 0), or re-attached to at `offset`.

        `started_at`: the job's start on the wall clock (its `status.startTime`) when the agent
        did not start it itself; the duration is then measured from there.
        """
        self._not_pending(ref.uid)
        started = self._clock()
        if started_at is not None:
            started -= max(0.0, self._wall() - started_at)
        known = self._jobs.get(ref.uid)
        if known is not None:
            known.offset = max(known.offset, offset)
            return
        self._jobs[ref.uid] = _Job(ref.namespace, ref.name, started, offset)
        self._active.labels(self.node).set(len(self._jobs))

    def progress(self, ref: ObjectRef, offset: int, length: int) -> None:
        """QEMU's latest offset/len of the object's job."""
        job = self._jobs.get(ref.uid)
        if job is None:
            return
        if offset > job.offset:
            self._streamed.labels(self.node).inc(offset - job.offset)
            job.offset = offset
        self._ratio.labels(job.namespace, job.name, self.node).set(
            min(1.0, offset / length) if length > 0 else 1.0
        )
        self._remaining.labels(job.namespace, job.name, self.node).set(max(0, length - offset))

    def pending(self, ref: ObjectRef, reason: str) -> None:
        """The object waits with this reason and has no job in QEMU (any more)."""
        self._drop_job(ref.uid)
        before = self._pending.get(ref.uid)
        if before == reason:
            return
        self._pending[ref.uid] = reason
        if before is not None:
            self._pending_gauge(before).dec()
        self._pending_gauge(reason).inc()

    def job_finished(self, ref: ObjectRef, result: JobResult) -> None:
        """The object reached an outcome (or its job was cancelled by a delete)."""
        self._finished.labels(self.node, result.value).inc()
        job = self._jobs.get(ref.uid)
        if job is not None:
            self._duration.labels(self.node, result.value).observe(max(0.0, self._clock() - job.started))
        self.forget(ref.uid)

    def forget(self, uid: str) -> None:
        """The object is finished or gone: drop everything kept about it."""
        self._not_pending(uid)
        self._drop_job(uid)

    def _not_pending(self, uid: str) -> None:
        reason = self._pending.pop(uid, None)
        if reason is not None:
            self._pending_gauge(reason).dec()

    def _pending_gauge(self, reason: str) -> Gauge:
        # Queued objects are counted by blockpull_jobs_queued, not under a pending reason.
        return self._queued.labels(self.node) if reason == QUEUED else self._waiting.labels(self.node, reason)

    def _drop_job(self, uid: str) -> None:
        job = self._jobs.pop(uid, None)
        if job is None:
            return
        self._active.labels(self.node).set(len(self._jobs))
        for family in (self._ratio, self._remaining):
            with contextlib.suppress(KeyError):  # no progress was reported yet
                family.remove(job.namespace, job.name, self.node)

    @property
    def jobs(self) -> int:
        return len(self._jobs)

    # --- serving ----------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve `/metrics` from a daemon thread; OSError when the port cannot be bound."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
