"""The lifecycle of a BlockPull through a real agent process, a real QEMU and real chains:
Pending with each reason, Running, Completed, and each way of Failing."""

from __future__ import annotations

import re
from pathlib import Path

from harness import (
    AgentFactory,
    AgentProcess,
    Namespace,
    VMFactory,
    assert_flattened,
    assert_intact,
    assert_no_jobs,
    silent_socket,
    socket_path,
)

from qemulab import Chain, Disk, InjectError

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_full_pull_completes_with_every_status_field(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    created = ns.create("flatten", nodeName="node-a", vm="web-1", disk=vm.disks[0].top)
    status = ns.wait_phase("flatten", "Completed", "Failed")

    assert status["phase"] == "Completed", status
    assert status["reason"] == "Completed"
    assert status["nodeName"] == "node-a"
    assert status["observedGeneration"] == created["metadata"]["generation"]
    assert status["jobId"] == f"blockpull-{created['metadata']['uid']}"
    assert status["target"] == {"node": vm.disks[0].top}
    assert status["progress"] == "100.00%"
    assert status["offset"] == status["length"] == chain4.size
    assert status["bandwidth"] == 0
    assert RFC3339.match(status["startTime"]) and RFC3339.match(status["completionTime"])
    assert status["startTime"] <= status["completionTime"]
    assert status["releasedImages"] == [str(p) for p in reversed(chain4.images[:-1])]
    assert status["message"] == "pulled the data of 3 backing image(s) into the disk (virtual size 64.0 MiB)"
    assert ns.conditions("flatten") == {
        "Running": "False", "Completed": "True", "Failed": "False",
        "Reconciling": "False", "Stalled": "False", "Ready": "True",
    }  # fmt: skip
    completed = ns.condition("flatten", "Completed")
    assert completed["reason"] == "Completed" and completed["observedGeneration"] == 1
    ns.assert_event_reasons("flatten", ["Started", "Completed"])
    events = ns.events("flatten")
    assert [(e["type"], e["reason"]) for e in events] == [("Normal", "Started"), ("Normal", "Completed")]
    assert events[1]["message"] == status["message"]
    # The outcome is written, so QEMU may forget the job: it is dismissed right after.
    assert_no_jobs(vm)
    vm.stop_sync()
    assert_flattened(chain4)


def test_pull_to_a_base_by_path_keeps_the_base(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    base = chain4.images[1]  # mid1: keep it and the template below it
    ns.create("to-base", nodeName="node-a", vm="web-1", disk=str(chain4.top), base=str(base))
    status = ns.wait_phase("to-base", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    assert status["target"] == {"node": vm.disks[0].top, "base": vm.disks[0].format_nodes[1]}
    assert status["releasedImages"] == [str(chain4.images[2])]
    vm.stop_sync()
    assert_flattened(chain4, keep=2)


def test_waiting_for_vm_then_starts_by_itself_when_the_vm_appears(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    ns.create("early", nodeName="node-a", vm="web-2", disk="disk0-fmt3")
    status = ns.wait_reason("early", "Pending", "WaitingForVM")
    assert status["message"].startswith("no QMP socket at "), status
    assert ns.conditions("early") == {
        "Running": "False", "Completed": "False", "Failed": "False",
        "Reconciling": "True", "Stalled": "False", "Ready": "False",
    }  # fmt: skip
    assert ns.condition("early", "Running")["reason"] == "WaitingForVM"
    assert "jobId" not in status and "startTime" not in status

    vm = vm_in("web-2", [chain4])
    assert ns.wait_phase("early", "Completed", "Failed")["phase"] == "Completed"
    vm.stop_sync()
    assert_flattened(chain4)


def test_qemu_unavailable_while_the_socket_is_silent_then_runs(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory, sockets: Path
) -> None:
    path = socket_path(sockets, ns.name, "web-3")
    with silent_socket(path):
        ns.create("silent", nodeName="node-a", vm="web-3", disk="disk0-fmt3")
        status = ns.wait_reason("silent", "Pending", "QEMUUnavailable")
        assert ns.condition("silent", "Running")["reason"] == "QEMUUnavailable"
        assert status["message"], status
    vm = vm_in("web-3", [chain4])
    assert ns.wait_phase("silent", "Completed", "Failed", timeout=30)["phase"] == "Completed"
    vm.stop_sync()
    assert_flattened(chain4)


def test_second_pull_on_a_busy_disk_waits_and_runs_after_the_first(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create(
        "first", nodeName="node-a", vm="web-1", disk=str(slow_chain.top),
        base=str(slow_chain.images[0]), bandwidth="1Mi",
    )  # fmt: skip
    ns.wait_phase("first", "Running")
    ns.create("second", nodeName="node-a", vm="web-1", disk=str(slow_chain.top))
    busy = ns.wait_reason("second", "Pending", "DiskBusy")
    assert "first" in busy["message"] or "blockpull-" in busy["message"], busy
    ns.patch_spec("first", bandwidth=0)
    assert ns.wait_phase("first", "Completed", "Failed")["phase"] == "Completed"
    second = ns.wait_phase("second", "Completed", "Failed")
    assert second["phase"] == "Completed", second
    assert second["releasedImages"] == [str(slow_chain.images[0])]
    ns.assert_event_reasons("second", ["Started", "Completed"])
    vm.stop_sync()
    assert_flattened(slow_chain)


def test_io_error_fails_with_qemus_message_and_leaves_the_chain_intact(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    disk = Disk(chain4, inject={0: [InjectError(sector=2048)]})
    vm = vm_in("web-1", [disk])
    ns.create("eio", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, onError="report")
    status = ns.wait_phase("eio", "Completed", "Failed")
    assert (status["phase"], status["reason"]) == ("Failed", "IOError"), status
    assert status["message"] == "Input/output error"
    assert RFC3339.match(status["completionTime"])
    failed = ns.condition("eio", "Failed")
    assert (failed["status"], failed["reason"], failed["message"]) == (
        "True",
        "IOError",
        "Input/output error",
    )
    assert ns.conditions("eio") == {
        "Running": "False", "Completed": "False", "Failed": "True",
        "Reconciling": "False", "Stalled": "True", "Ready": "False",
    }  # fmt: skip
    ns.assert_event_reasons("eio", ["Started", "Failed"])
    events = ns.events("eio")
    assert [(e["type"], e["reason"]) for e in events] == [("Normal", "Started"), ("Warning", "Failed")]
    assert "Input/output error" in events[-1]["message"]
    assert_no_jobs(vm)
    assert vm.alive
    vm.stop_sync()
    assert_intact(chain4)


def test_unknown_disk_fails_with_disk_not_found(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    ns.create("nodisk", nodeName="node-a", vm="web-1", disk="vdz")
    status = ns.wait_phase("nodisk", "Completed", "Failed")
    assert (status["phase"], status["reason"]) == ("Failed", "DiskNotFound"), status
    assert "vdz" in status["message"]
    ns.assert_event_reasons("nodisk", ["Failed"])
    assert "jobId" not in status
    assert_no_jobs(vm)
    assert vm.alive
    vm.stop_sync()
    assert_intact(chain4)


def test_base_outside_the_chain_fails_with_base_not_in_chain(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    ns.create("nobase", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, base="/images/elsewhere.qcow2")
    status = ns.wait_phase("nobase", "Completed", "Failed")
    assert (status["phase"], status["reason"]) == ("Failed", "BaseNotInChain"), status
    assert "/images/elsewhere.qcow2" in status["message"]
    assert_no_jobs(vm)
    assert vm.alive
    vm.stop_sync()
    assert_intact(chain4)


def test_a_vm_name_too_long_for_the_socket_template_fails_invalid_spec(
    ns: Namespace, agent_factory: AgentFactory, sockets: Path
) -> None:
    # The template is valid (short names fit) but a 40-character VM name does not fit in a
    # unix socket path: the schema cannot know, the agent says so.
    agent_factory(BLOCKPULL_SOCKET_TEMPLATE=f"{sockets}/{'d' * 40}/{{namespace}}/{{vm}}.qmp")
    vm = "v" * 40
    ns.create("toolong", nodeName="node-a", vm=vm, disk="vda")
    status = ns.wait_phase("toolong", "Completed", "Failed")
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec"), status
    assert "bytes long; unix socket paths allow at most 107" in status["message"], status
    assert ns.conditions("toolong") == {
        "Running": "False", "Completed": "False", "Failed": "True",
        "Reconciling": "False", "Stalled": "True", "Ready": "False",
    }  # fmt: skip
    ns.assert_event_reasons("toolong", ["Failed"])
    failed = ns.events("toolong")[-1]
    assert (failed["type"], failed["reason"]) == ("Warning", "Failed")
    assert "InvalidSpec" in failed["message"]


def test_qemu_gone_mid_pull_fails_with_vm_exited(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("gone", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    ns.wait_phase("gone", "Running")
    vm.kill()
    # The agent waits BLOCKPULL_VM_GONE_GRACE (3 s here) for QEMU to come back, then fails.
    pending = ns.wait_reason("gone", "Pending", "QEMUUnavailable", timeout=10)
    assert "went away" in pending["message"]
    status = ns.wait_phase("gone", "Completed", "Failed", timeout=20)
    assert (status["phase"], status["reason"]) == ("Failed", "VMExited"), status
    ns.wait_event("gone", "Failed")
    assert_intact(slow_chain)


def test_deadline_while_pending_fails_with_deadline_exceeded(ns: Namespace, agent: AgentProcess) -> None:
    ns.create("late", nodeName="node-a", vm="never", disk="vda", activeDeadlineSeconds=2)
    ns.wait_reason("late", "Pending", "WaitingForVM")
    status = ns.wait_phase("late", "Completed", "Failed", timeout=15)
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded"), status
    assert "activeDeadlineSeconds=2" in status["message"]


def test_deadline_while_running_cancels_the_job_and_fails(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create(
        "slow", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi", activeDeadlineSeconds=3
    )
    ns.wait_phase("slow", "Running")
    status = ns.wait_phase("slow", "Completed", "Failed", timeout=20)
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded"), status
    assert "job cancelled at" in status["message"] and "chain intact" in status["message"]
    assert 0 < status["offset"] < status["length"]
    assert_no_jobs(vm)
    vm.stop_sync()
    assert_intact(slow_chain)


def test_completed_means_durable_even_if_qemu_is_killed_right_after(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    ns.create("durable", nodeName="node-a", vm="web-1", disk=vm.disks[0].top)
    ns.wait_phase("durable", "Completed")
    vm.kill()  # SIGKILL the moment the object says Completed: no quit, no guest flush
    assert_flattened(chain4)
