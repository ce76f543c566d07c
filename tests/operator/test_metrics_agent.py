"""The agent process's /metrics over HTTP while real jobs run in a real QEMU, and after.

Parsed with prometheus_client's own parser: every family with its type, per-object series
present only while a job runs, the counters right at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harness import AgentProcess, Namespace, Scrape, VMFactory, eventually

from qemulab import Chain

MiB = 1 << 20
TYPES = {
    "blockpull_jobs_active": "gauge",
    "blockpull_jobs_queued": "gauge",
    "blockpull_jobs_finished": "counter",
    "blockpull_job_duration_seconds": "histogram",
    "blockpull_streamed_bytes": "counter",
    "blockpull_job_progress_ratio": "gauge",
    "blockpull_job_remaining_bytes": "gauge",
    "blockpull_jobs_pending": "gauge",
}


def test_metrics_while_two_jobs_run_and_after_one_completes_and_one_fails(
    ns: Namespace, agent: AgentProcess, chain_factory: Callable[..., Chain], vm_in: VMFactory
) -> None:
    before = Scrape(agent)
    assert before.types() == TYPES
    assert before.value("blockpull_jobs_active", "blockpull_jobs_active", node="node-a") == 0
    assert before.value("blockpull_jobs_queued", "blockpull_jobs_queued", node="node-a") == 0
    assert before.samples("blockpull_job_progress_ratio") == []

    chains = [chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=16 * MiB) for _ in range(2)]
    vm = vm_in("web-1", chains)
    ns.create("done", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="2Mi")
    ns.create(
        "late", nodeName="node-a", vm="web-1", disk=vm.disks[1].top, bandwidth="1Mi", activeDeadlineSeconds=4
    )
    for name in ("done", "late"):
        ns.wait_phase(name, "Running")

    def both_progressing() -> Scrape | None:
        scrape = Scrape(agent)
        ratios = scrape.samples("blockpull_job_progress_ratio")
        return scrape if len(ratios) == 2 and all(v > 0 for _, v in ratios) else None

    during = eventually(both_progressing, timeout=10, what="both jobs' progress in /metrics")
    assert during.types() == TYPES
    assert during.value("blockpull_jobs_active", "blockpull_jobs_active", node="node-a") == 2
    for name in ("done", "late"):
        labels = {"namespace": ns.name, "name": name, "node": "node-a"}
        ratio = during.value("blockpull_job_progress_ratio", "blockpull_job_progress_ratio", **labels)
        remaining = during.value("blockpull_job_remaining_bytes", "blockpull_job_remaining_bytes", **labels)
        assert 0 < ratio < 1 and 0 < remaining < 64 * MiB, (name, ratio, remaining)
    assert during.value("blockpull_streamed_bytes", "blockpull_streamed_bytes_total", node="node-a") > 0

    failed = ns.wait_phase("late", "Completed", "Failed", timeout=20)
    assert (failed["phase"], failed["reason"]) == ("Failed", "DeadlineExceeded")
    ns.patch_spec("done", bandwidth=0)
    completed = ns.wait_phase("done", "Completed", "Failed", timeout=30)
    assert completed["phase"] == "Completed"

    after = eventually(
        lambda: (
            (s := Scrape(agent)).value("blockpull_jobs_active", "blockpull_jobs_active", node="node-a") == 0
            and s
        ),
        timeout=5,
        what="no active job",
    )
    assert after.types() == TYPES
    assert after.samples("blockpull_job_progress_ratio") == []
    assert after.samples("blockpull_job_remaining_bytes") == []
    finished = {
        labels["result"]: value
        for labels, value in after.samples("blockpull_jobs_finished", "blockpull_jobs_finished_total")
    }
    assert finished == {"completed": 1, "failed": 1, "cancelled": 0}
    counts = {
        labels["result"]: value
        for labels, value in after.samples(
            "blockpull_job_duration_seconds", "blockpull_job_duration_seconds_count"
        )
    }
    assert counts == {"completed": 1, "failed": 1, "cancelled": 0}
    sums: dict[str, Any] = {
        labels["result"]: value
        for labels, value in after.samples(
            "blockpull_job_duration_seconds", "blockpull_job_duration_seconds_sum"
        )
    }
    # The deadline job ran about its 4 s (counted from a one-second startTime); both far less than a minute.
    assert 2 < sums["failed"] < 30 and 0 < sums["completed"] < 60, sums
    # Every byte QEMU streamed, counted once: the completed job's whole length plus how far the
    # cancelled one got (both as the status records them).
    streamed = after.value("blockpull_streamed_bytes", "blockpull_streamed_bytes_total", node="node-a")
    assert streamed == completed["offset"] + failed["offset"], (
        streamed,
        completed["offset"],
        failed["offset"],
    )
    assert completed["offset"] == completed["length"] == 64 * MiB
    assert 0 < failed["offset"] < failed["length"]
    pending = {labels["reason"]: value for labels, value in after.samples("blockpull_jobs_pending")}
    assert set(pending.values()) == {0}, pending


def test_metrics_of_a_pending_object_and_a_delete_before_start(ns: Namespace, agent: AgentProcess) -> None:
    ns.create("waiting", nodeName="node-a", vm="nowhere", disk="vda")
    ns.wait_reason("waiting", "Pending", "WaitingForVM")
    scrape = Scrape(agent)
    assert (
        scrape.value("blockpull_jobs_pending", "blockpull_jobs_pending", node="node-a", reason="WaitingForVM")
        == 1
    )
    assert scrape.samples("blockpull_job_progress_ratio") == []
    ns.delete("waiting")
    ns.wait_gone("waiting")
    after = eventually(
        lambda: (
            (s := Scrape(agent)).value(
                "blockpull_jobs_pending", "blockpull_jobs_pending", node="node-a", reason="WaitingForVM"
            )
            == 0
            and s
        ),
        timeout=5,
        what="no longer pending",
    )
    # Deleted before its job started: not counted as finished.
    assert {v for _, v in after.samples("blockpull_jobs_finished", "blockpull_jobs_finished_total")} == {0}
