"""Outcomes are never lost or repeated: agent killed mid-job, agent down while the job ends,
finished objects re-applied, replaced (kopf's annotations wiped) and resynced."""

from __future__ import annotations

import calendar
import json
import signal
import time
from collections.abc import Callable

from harness import (
    AgentProcess,
    JobEvents,
    Namespace,
    VMFactory,
    assert_flattened,
    assert_intact,
    assert_no_jobs,
    eventually,
)

from blockpull.agent import status as st
from qemulab import Chain, QemuVM, compare


def seconds(rfc3339: str) -> int:
    return calendar.timegm(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ"))


def test_agent_sigkilled_mid_job_reattaches_to_the_same_qemu_job(
    ns: Namespace,
    agent: AgentProcess,
    slow_chain: Chain,
    vm_in: VMFactory,
    job_events: Callable[[QemuVM], JobEvents],
) -> None:
    vm = vm_in("web-1", [slow_chain], extra_monitors=1)
    events = job_events(vm)
    ns.create("survivor", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    job_id = ns.wait_phase("survivor", "Running")["jobId"]
    eventually(lambda: ns.status("survivor").get("offset", 0) > 0, what="progress before the kill")

    agent.kill()  # SIGKILL: no cleanup at all
    before = ns.status("survivor")["offset"]
    time.sleep(1.5)
    jobs = vm.execute_sync("query-block-jobs")
    assert [j["device"] for j in jobs] == [job_id]  # QEMU carries on without the agent
    assert jobs[0]["offset"] >= before

    agent.start()
    # Re-attached: progress resumes from where QEMU is, not from zero.
    eventually(
        lambda: ns.status("survivor").get("offset", 0) > jobs[0]["offset"], what="progress after restart"
    )
    assert ns.status("survivor")["phase"] == "Running"
    ns.patch_spec("survivor", bandwidth=0)
    status = ns.wait_phase("survivor", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    assert status["jobId"] == job_id
    # One QEMU job, from start to end; one Started event.
    assert events.statuses(job_id).count("created") == 1
    assert "concluded" in events.statuses(job_id)
    ns.assert_event_reasons("survivor", ["Started", "BandwidthChanged", "Completed"])
    assert status["releasedImages"] == [str(p) for p in reversed(slow_chain.images[:-1])]
    assert_no_jobs(vm)
    vm.stop_sync()
    assert_flattened(slow_chain)  # with qemu-img check clean


def test_job_that_ends_while_the_agent_is_down_is_reported_then_dismissed(
    ns: Namespace,
    agent: AgentProcess,
    slow_chain: Chain,
    vm_in: VMFactory,
    job_events: Callable[[QemuVM], JobEvents],
) -> None:
    vm = vm_in("web-1", [slow_chain], extra_monitors=1)
    events = job_events(vm)
    ns.create("offline", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    job_id = ns.wait_phase("offline", "Running")["jobId"]
    stopping = time.monotonic()
    assert agent.stop() == 0  # SIGTERM, as the kubelet does: QEMU keeps the job
    assert time.monotonic() - stopping < 3  # prompt, well inside a pod's grace period

    vm.execute_sync("block-job-set-speed", {"device": job_id, "speed": 0})
    eventually(lambda: "pending" in events.statuses(job_id), timeout=30, what="job pending in QEMU")
    pending_at = events.qemu_time(job_id, "pending")
    assert pending_at is not None
    # Nobody finalized it: QEMU holds the copied job at `pending`, chain unchanged, for the agent.
    time.sleep(1.2)
    assert [j["status"] for j in vm.execute_sync("query-jobs")] == ["pending"]
    assert ns.status("offline")["phase"] == "Running"

    agent.start()
    status = ns.wait_phase("offline", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    # The agent finalized it on its return: completionTime is that moment, after the copy.
    assert int(pending_at) <= seconds(status["completionTime"]) <= time.time() + 1
    concluded_at = events.qemu_time(job_id, "concluded")
    assert concluded_at is not None and concluded_at >= pending_at
    assert status["releasedImages"] == [str(p) for p in reversed(slow_chain.images[:-1])]
    assert_no_jobs(vm)
    assert events.statuses(job_id).count("created") == 1
    ns.assert_event_reasons("offline", ["Started", "Completed"])
    vm.stop_sync()
    assert compare(slow_chain.top, slow_chain.reference)


def test_finished_object_reapplied_replaced_and_resynced_never_runs_again(
    ns: Namespace,
    agent: AgentProcess,
    chain4: Chain,
    vm_in: VMFactory,
    job_events: Callable[[QemuVM], JobEvents],
) -> None:
    vm = vm_in("web-1", [chain4], extra_monitors=1)
    events = job_events(vm)
    manifest = ns.manifest("gitops", nodeName="node-a", vm="web-1", disk=str(chain4.top))
    ns.apply(manifest)
    done = ns.wait_phase("gitops", "Completed")
    assert_no_jobs(vm)
    job_id = done["jobId"]
    time.sleep(1)  # let the agent settle (finalizer release and the like)
    settled = ns.status("gitops")

    # A GitOps tool re-applies the same manifest forever.
    for _ in range(3):
        assert "unchanged" in ns.apply(manifest).stdout
    # `kubectl replace` drops every annotation kopf or kubectl had put on the object.
    live = ns.get("gitops")
    assert live is not None
    replaced = {**manifest, "metadata": {"name": "gitops", "namespace": ns.name}}
    ns.kubectl("replace", "-f", "-", input=json.dumps(replaced))
    assert not (ns.get("gitops") or {})["metadata"].get("annotations")
    # And the agent restarts (a resync of everything).
    agent.stop()
    agent.start()
    time.sleep(2)

    assert ns.status("gitops") == settled
    assert events.statuses(job_id).count("created") == 1
    assert [ev for ev in events.watcher.events("JOB_STATUS_CHANGE") if ev.job_id != job_id] == []
    ns.assert_event_reasons("gitops", ["Started", "Completed"])
    assert_no_jobs(vm)


def test_job_dismissed_by_someone_else_is_judged_from_the_chain(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("stolen", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    job_id = ns.wait_phase("stolen", "Running")["jobId"]
    # An admin finishes the job by hand and dismisses it (e.g. `blockpull wait` on the node),
    # before the agent can (frozen meanwhile, so that the race is decided).
    agent.kill(signal.SIGSTOP, wait=False)
    try:
        vm.execute_sync("block-job-set-speed", {"device": job_id, "speed": 0})
        eventually(
            lambda: [j["status"] for j in vm.execute_sync("query-jobs")] == ["pending"], what="pending"
        )
        vm.execute_sync("job-finalize", {"id": job_id})
        eventually(
            lambda: [j["status"] for j in vm.execute_sync("query-jobs")] == ["concluded"], what="concluded"
        )
        vm.execute_sync("job-dismiss", {"id": job_id})
    finally:
        agent.kill(signal.SIGCONT, wait=False)
    status = ns.wait_phase("stolen", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    vm.stop_sync()
    assert_flattened(slow_chain)


def test_job_cancelled_by_someone_else_fails_cancelled_with_the_chain_intact(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("cancelled", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    job_id = ns.wait_phase("cancelled", "Running")["jobId"]
    vm.execute_sync("job-cancel", {"id": job_id})
    status = ns.wait_phase("cancelled", "Completed", "Failed")
    assert (status["phase"], status["reason"]) == ("Failed", "Cancelled"), status
    assert "outside BlockPull" in status["message"]
    vm.stop_sync()
    assert_intact(slow_chain)


def test_a_concluded_job_left_behind_by_a_finished_object_is_dismissed_at_start(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    # The agent writes the outcome, then dismisses the job; killed in between, it leaves a
    # Completed object and a concluded job in QEMU. Build exactly that state by hand.
    agent.kill()
    vm = vm_in("web-1", [chain4])
    created = ns.create("leftover", nodeName="node-a", vm="web-1", disk=vm.disks[0].top)
    job_id = f"blockpull-{created['metadata']['uid']}"
    vm.execute_sync("block-stream", {"job-id": job_id, "device": vm.disks[0].top, "auto-dismiss": False})
    eventually(
        lambda: [j["status"] for j in vm.execute_sync("query-jobs")] == ["concluded"], what="concluded"
    )
    # The status the agent writes on completion (same code), written here instead.
    view = st.StatusView(
        phase=st.COMPLETED, reason="Completed", message="streamed", job_id=job_id,
        completion_time=st.now_rfc3339(),
    )  # fmt: skip
    status = st.build_status(None, view, generation=1, now=st.now_rfc3339(), node_name="node-a")
    ns.custom.patch_namespaced_custom_object_status(
        "blockpull.dev", "v1alpha1", ns.name, "blockpulls", "leftover", {"status": status}
    )
    agent.start()
    assert_no_jobs(vm, timeout=10)
    assert ns.status("leftover")["phase"] == "Completed"
    assert ns.event_reasons("leftover") == []  # nothing reported twice
