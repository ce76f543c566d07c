"""Deleting a BlockPull aborts its pull: the job is cancelled, the chain stays whole and valid,
and the object never hangs in Terminating, whatever state QEMU is in."""

from __future__ import annotations

import signal
import time

from harness import FINALIZER, AgentProcess, Namespace, VMFactory, assert_intact, assert_no_jobs, eventually

from qemulab import Chain, check, compare


def test_delete_while_running_cancels_the_job(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("run", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    ns.wait_phase("run", "Running")
    assert ns.get("run")["metadata"]["finalizers"] == [FINALIZER]  # type: ignore[index]
    started = time.monotonic()
    ns.delete("run")
    ns.wait_gone("run", timeout=15)
    assert time.monotonic() - started < 5  # gone as soon as QEMU confirmed
    assert_no_jobs(vm)
    cancelled = ns.wait_event("run", "Cancelled")
    assert cancelled["type"] == "Normal" and "chain intact" in cancelled["message"]
    assert vm.alive
    vm.stop_sync()
    assert_intact(slow_chain)


def test_delete_while_paused_cancels_the_job(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("pz", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    ns.wait_phase("pz", "Running")
    ns.patch_spec("pz", paused=True)
    ns.wait_phase("pz", "Paused")
    ns.delete("pz")
    ns.wait_gone("pz", timeout=15)
    assert_no_jobs(vm)
    assert ns.wait_event("pz", "Cancelled")["type"] == "Normal"
    vm.stop_sync()
    assert_intact(slow_chain)


def test_delete_while_pending_is_immediate(ns: Namespace, agent: AgentProcess) -> None:
    ns.create("wait", nodeName="node-a", vm="absent", disk="vda")
    ns.wait_reason("wait", "Pending", "WaitingForVM")
    started = time.monotonic()
    ns.delete("wait")
    ns.wait_gone("wait", timeout=10)
    assert time.monotonic() - started < 3


def test_finished_object_carries_no_finalizer_and_goes_even_without_an_agent(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    ns.create("done", nodeName="node-a", vm="web-1", disk=vm.disks[0].top)
    ns.wait_phase("done", "Completed")
    eventually(
        lambda: not ns.get("done")["metadata"].get("finalizers"), timeout=10, what="finalizer released"
    )  # type: ignore[index]
    agent.stop()
    ns.delete("done")
    ns.wait_gone("done", timeout=5)
    assert_no_jobs(vm)  # and QEMU was not asked anything


def test_delete_with_qemu_silent_finishes_after_a_bounded_wait_with_a_warning(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("hung", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    ns.wait_phase("hung", "Running")
    assert vm.pid is not None
    vm.kill(signal.SIGSTOP, wait=False)  # QEMU alive but silent
    try:
        started = time.monotonic()
        ns.delete("hung")
        # BLOCKPULL_DELETE_TIMEOUT is 5 s in these tests (30 s by default).
        ns.wait_gone("hung", timeout=30)
        assert time.monotonic() - started < 20
        ns.wait_event("hung", "AbortUnconfirmed")
        warnings = [e for e in ns.events("hung") if e["type"] == "Warning"]
        assert [w["reason"] for w in warnings] == ["AbortUnconfirmed"], warnings
        assert "without QEMU confirming" in warnings[0]["message"]
    finally:
        vm.kill(signal.SIGCONT, wait=False)
    vm.stop_sync()
    assert check(slow_chain.top).corruptions == 0
    assert compare(slow_chain.top, slow_chain.reference)


def test_delete_with_qemu_gone_finishes_with_a_warning(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.create("lost", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    ns.wait_phase("lost", "Running")
    vm.kill()
    ns.delete("lost")
    ns.wait_gone("lost", timeout=30)
    ns.wait_event("lost", "AbortUnconfirmed")
    warnings = [e for e in ns.events("lost") if e["type"] == "Warning"]
    assert [w["reason"] for w in warnings] == ["AbortUnconfirmed"], warnings
    assert_intact(slow_chain)
