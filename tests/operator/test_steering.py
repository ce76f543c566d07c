"""Live changes to a running BlockPull: bandwidth, pause and resume, and ttlSecondsAfterFinished."""

from __future__ import annotations

import time

from harness import AgentProcess, Namespace, VMFactory, assert_flattened, assert_no_jobs, eventually

from qemulab import Chain, compare

MiB = 1 << 20


def qemu_job(vm: object, job_id: str) -> dict[str, object]:
    jobs = [j for j in vm.execute_sync("query-block-jobs") if j["device"] == job_id]  # type: ignore[attr-defined]
    assert jobs, f"no job {job_id} in QEMU"
    return dict(jobs[0])


def test_bandwidth_edit_reaches_qemu_while_running(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("bw", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    status = ns.wait_phase("bw", "Running")
    job_id = status["jobId"]
    assert status["bandwidth"] == MiB
    assert qemu_job(vm, job_id)["speed"] == MiB

    ns.patch_spec("bw", bandwidth="2Mi")
    eventually(lambda: qemu_job(vm, job_id)["speed"] == 2 * MiB, timeout=10, what="speed 2Mi in QEMU")
    eventually(lambda: ns.status("bw").get("bandwidth") == 2 * MiB, timeout=10, what="status.bandwidth")
    changed = ns.wait_event("bw", "BandwidthChanged")
    assert changed["type"] == "Normal" and changed["message"] == "bandwidth 1.0 MiB/s -> 2.0 MiB/s"
    assert ns.status("bw")["observedGeneration"] == 2

    ns.patch_spec("bw", bandwidth=0)  # unlimited: finishes at once
    status = ns.wait_phase("bw", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    ns.assert_event_reasons("bw", ["Started", "BandwidthChanged", "BandwidthChanged", "Completed"])
    vm.stop_sync()
    assert_flattened(slow_chain)


def test_pause_and_resume_edits_reach_qemu(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("pz", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    job_id = ns.wait_phase("pz", "Running")["jobId"]

    ns.patch_spec("pz", paused=True)
    status = ns.wait_phase("pz", "Paused", timeout=10)
    assert status["reason"] == "Paused"
    assert qemu_job(vm, job_id)["paused"] is True
    running = ns.condition("pz", "Running")
    assert running["status"] == "True", running  # a job exists in QEMU: Running stays True
    paused_at = qemu_job(vm, job_id)["offset"]
    time.sleep(1.5)
    assert qemu_job(vm, job_id)["offset"] == paused_at  # nothing copied while paused
    assert ns.wait_event("pz", "Paused")["type"] == "Normal"

    ns.patch_spec("pz", paused=False, bandwidth=0)
    status = ns.wait_phase("pz", "Completed", "Failed", timeout=30)
    assert status["phase"] == "Completed", status
    ns.wait_event("pz", "Completed")
    reasons = ns.event_reasons("pz")
    assert reasons[:2] == ["Started", "Paused"] and "Resumed" in reasons and reasons[-1] == "Completed"
    vm.stop_sync()
    assert compare(slow_chain.top, slow_chain.reference)


def test_created_paused_waits_without_a_job_and_runs_when_unpaused(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    ns.create("born-paused", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, paused=True)
    status = ns.wait_reason("born-paused", "Pending", "Paused", timeout=10)
    assert status["message"] == "spec.paused is true: the pull starts when it is set to false"
    time.sleep(1)
    assert_no_jobs(vm)  # QEMU cannot start a job paused: none yet
    ns.patch_spec("born-paused", paused=False)
    assert ns.wait_phase("born-paused", "Completed", "Failed")["phase"] == "Completed"
    vm.stop_sync()
    assert compare(chain4.top, chain4.reference)


def test_ttl_deletes_the_finished_object(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm_in("web-1", [chain4])
    ns.create("short-lived", nodeName="node-a", vm="web-1", disk=str(chain4.top), ttlSecondsAfterFinished=2)
    status = ns.wait_phase("short-lived", "Completed", "Failed")
    assert status["phase"] == "Completed"
    finished = time.monotonic()
    ns.wait_gone("short-lived", timeout=15)
    # completionTime has 1 s resolution: gone between 1 and 4 s after it was seen Completed.
    assert 1.0 <= time.monotonic() - finished <= 6.0


def test_ttl_added_after_the_end_still_applies(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm_in("web-1", [chain4])
    ns.create("keep", nodeName="node-a", vm="web-1", disk=str(chain4.top))
    ns.wait_phase("keep", "Completed")
    time.sleep(1)
    assert ns.get("keep") is not None
    ns.patch_spec("keep", ttlSecondsAfterFinished=0)
    ns.wait_gone("keep", timeout=10)
