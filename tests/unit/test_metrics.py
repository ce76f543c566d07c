"""The agent's metrics: the contract's families, per-object series only while a job runs,
counters counted once, and a start that fails with one line when the port is bad or taken."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blockpull.agent.kube import ObjectRef
from blockpull.agent.metrics import AgentMetrics, JobResult
from blockpull.agent.settings import AgentSettings
from blockpull.errors import InvalidSpec

#: The contract's table: family -> (type, labels). Fixed: dashboards and alerts rely on it.
CONTRACT = {
    "blockpull_jobs_active": ("gauge", {"node"}),
    "blockpull_jobs_queued": ("gauge", {"node"}),
    "blockpull_jobs_finished": ("counter", {"node", "result"}),
    "blockpull_job_duration_seconds": ("histogram", {"node", "result"}),
    "blockpull_streamed_bytes": ("counter", {"node"}),
    "blockpull_job_progress_ratio": ("gauge", {"namespace", "name", "node"}),
    "blockpull_job_remaining_bytes": ("gauge", {"namespace", "name", "node"}),
}
#: Beyond the contract's table: Pending objects by reason (for the "pending too long" alert).
EXTRA = {"blockpull_jobs_pending": ("gauge", {"node", "reason"})}
FAMILIES = {**CONTRACT, **EXTRA}
A = ObjectRef("vms", "pull-a", "uid-a")
B = ObjectRef("vms", "pull-b", "uid-b")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(metrics: AgentMetrics) -> dict[str, Any]:
    """family name -> (type, {(sample name, frozen labels): value}), via the official parser."""
    text = generate_latest(metrics.registry).decode()
    return {
        family.name: (family.type, {(s.name, frozenset(s.labels.items())): s.value for s in family.samples})
        for family in text_string_to_metric_families(text)
    }


def value(scraped: dict[str, Any], family: str, sample: str, **labels: str) -> float | None:
    found: float | None = scraped[family][1].get((sample, frozenset(labels.items())))
    return found


def test_families_names_types_and_labels_are_the_contracts() -> None:
    metrics = AgentMetrics("node-a")
    metrics.job_started(A)
    metrics.progress(A, 10, 100)
    scraped = scrape(metrics)
    assert {name: kind for name, (kind, _) in scraped.items()} == {n: t for n, (t, _) in FAMILIES.items()}
    for name, (_, samples) in scraped.items():
        for sample, labels in samples:
            keys = {k for k, _ in labels} - {"le"}  # a histogram's bucket bound
            assert keys == FAMILIES[name][1], (name, sample, keys)
    # Node-level series exist from the start (rate() and absent() work before any job).
    fresh = scrape(AgentMetrics("node-b"))
    assert value(fresh, "blockpull_jobs_queued", "blockpull_jobs_queued", node="node-b") == 0
    assert value(fresh, "blockpull_jobs_active", "blockpull_jobs_active", node="node-b") == 0
    for result in ("completed", "failed", "cancelled"):
        assert (
            value(
                fresh,
                "blockpull_jobs_finished",
                "blockpull_jobs_finished_total",
                node="node-b",
                result=result,
            )
            == 0
        )
    assert fresh["blockpull_job_progress_ratio"][1] == {}


def test_each_agent_metrics_has_a_registry_of_its_own() -> None:
    one, two = AgentMetrics("node-a"), AgentMetrics("node-a")
    one.job_started(A)
    assert value(scrape(one), "blockpull_jobs_active", "blockpull_jobs_active", node="node-a") == 1
    assert value(scrape(two), "blockpull_jobs_active", "blockpull_jobs_active", node="node-a") == 0


def test_per_object_series_exist_only_while_the_job_runs() -> None:
    clock = Clock()
    metrics = AgentMetrics("node-a", clock=clock)
    metrics.job_started(A)
    metrics.job_started(B)
    metrics.progress(A, 25, 100)
    metrics.progress(B, 0, 400)
    s = scrape(metrics)
    assert value(s, "blockpull_jobs_active", "blockpull_jobs_active", node="node-a") == 2
    ratio = {"namespace": "vms", "name": "pull-a", "node": "node-a"}
    assert value(s, "blockpull_job_progress_ratio", "blockpull_job_progress_ratio", **ratio) == 0.25
    assert value(s, "blockpull_job_remaining_bytes", "blockpull_job_remaining_bytes", **ratio) == 75
    clock.now += 42
    metrics.progress(A, 100, 100)
    metrics.job_finished(A, JobResult.COMPLETED)
    s = scrape(metrics)
    assert value(s, "blockpull_jobs_active", "blockpull_jobs_active", node="node-a") == 1
    names = {dict(labels)["name"] for _, labels in s["blockpull_job_progress_ratio"][1]}
    assert names == {"pull-b"}
    assert {dict(labels)["name"] for _, labels in s["blockpull_job_remaining_bytes"][1]} == {"pull-b"}
    done = {"node": "node-a", "result": "completed"}
    assert value(s, "blockpull_jobs_finished", "blockpull_jobs_finished_total", **done) == 1
    assert value(s, "blockpull_job_duration_seconds", "blockpull_job_duration_seconds_sum", **done) == 42
    assert value(s, "blockpull_job_duration_seconds", "blockpull_job_duration_seconds_count", **done) == 1
    metrics.forget(B.uid)  # deleted before it finished: gone, and not counted
    s = scrape(metrics)
    assert s["blockpull_job_progress_ratio"][1] == {} and s["blockpull_job_remaining_bytes"][1] == {}
    assert value(s, "blockpull_jobs_active", "blockpull_jobs_active", node="node-a") == 0
    assert sum(v for (n, _), v in s["blockpull_jobs_finished"][1].items() if n.endswith("_total")) == 1


def test_streamed_bytes_count_each_byte_once_and_start_at_a_reattached_offset() -> None:
    metrics = AgentMetrics("node-a")
    metrics.job_started(A)
    for offset in (10, 30, 30, 20, 50):  # a stale reading never counts backwards
        metrics.progress(A, offset, 100)
    metrics.job_started(B, offset=60)  # re-attached after an agent restart: 60 were before us
    metrics.progress(B, 70, 100)
    metrics.job_finished(B, JobResult.FAILED)
    s = scrape(metrics)
    assert value(s, "blockpull_streamed_bytes", "blockpull_streamed_bytes_total", node="node-a") == 50 + 10


def test_outcomes_without_a_job_count_but_have_no_duration() -> None:
    metrics = AgentMetrics("node-a")
    metrics.job_finished(A, JobResult.FAILED)  # e.g. DiskNotFound: an outcome, no job ran
    clock = Clock()
    timed = AgentMetrics("node-a", clock=clock, wall=lambda: 5000.0)
    timed.job_started(B, offset=0, started_at=4900.0)  # re-attached: started 100 s ago
    clock.now += 20
    timed.job_finished(B, JobResult.CANCELLED)
    s, t = scrape(metrics), scrape(timed)
    failed = {"node": "node-a", "result": "failed"}
    assert value(s, "blockpull_jobs_finished", "blockpull_jobs_finished_total", **failed) == 1
    assert value(s, "blockpull_job_duration_seconds", "blockpull_job_duration_seconds_count", **failed) == 0
    cancelled = {"node": "node-a", "result": "cancelled"}
    assert (
        value(t, "blockpull_job_duration_seconds", "blockpull_job_duration_seconds_sum", **cancelled) == 120
    )


def test_pending_objects_by_reason() -> None:
    metrics = AgentMetrics("node-a")

    def pending() -> dict[str, float]:
        samples = scrape(metrics)["blockpull_jobs_pending"][1]
        return {dict(labels)["reason"]: v for (_, labels), v in samples.items() if v}

    metrics.pending(A, "Starting")
    metrics.pending(B, "Starting")
    metrics.pending(A, "WaitingForVM")
    metrics.pending(A, "WaitingForVM")
    assert pending() == {"Starting": 1, "WaitingForVM": 1}
    metrics.job_started(B)  # no longer waiting
    metrics.progress(B, 5, 10)
    assert pending() == {"WaitingForVM": 1}
    metrics.pending(B, "QEMUUnavailable")  # its QEMU went away mid-job: no job, no series
    assert scrape(metrics)["blockpull_job_progress_ratio"][1] == {}
    metrics.job_finished(A, JobResult.FAILED)
    metrics.forget(B.uid)
    assert pending() == {}


def test_metrics_port_settings() -> None:
    base = {"NODE_NAME": "w"}
    assert AgentSettings.from_env(base).metrics_port == 8081
    for off in ("0", "off", ""):
        assert AgentSettings.from_env({**base, "BLOCKPULL_METRICS_PORT": off}).metrics_port is None
    assert AgentSettings.from_env({**base, "BLOCKPULL_METRICS_PORT": "9464"}).metrics_port == 9464
    for bad in ("70000", "http", "-1", "80.5"):
        with pytest.raises(InvalidSpec, match="BLOCKPULL_METRICS_PORT must be a TCP port"):
            AgentSettings.from_env({**base, "BLOCKPULL_METRICS_PORT": bad})
    with pytest.raises(InvalidSpec, match="must differ"):
        AgentSettings.from_env({**base, "BLOCKPULL_METRICS_PORT": "8080"})


def _agent(**env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("BLOCKPULL_", "KUBE"))}
    full.update(NODE_NAME="node-a", BLOCKPULL_LIVENESS_PORT="0", KUBECONFIG="/nonexistent", **env)
    return subprocess.run(
        [sys.executable, "-m", "blockpull.agent"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("port", ["70000", "metrics", "8080x"])
def test_agent_refuses_a_bad_metrics_port_with_one_line(port: str) -> None:
    result = _agent(BLOCKPULL_METRICS_PORT=port)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("blockpull-agent: error: BLOCKPULL_METRICS_PORT must be a TCP port")


def test_agent_refuses_a_taken_metrics_port_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _agent(BLOCKPULL_METRICS_PORT=str(port))
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"blockpull-agent: error: BLOCKPULL_METRICS_PORT {port}: cannot serve")
    assert "in use" in result.stderr
