"""A finished job nobody collected never blocks a disk silently: the agent collects its own
orphans, and a job of another client is named with the one command that collects it. An edit
made while the agent was down is applied and said when it comes back."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

from harness import AgentProcess, Namespace, VMFactory, assert_flattened, eventually

from qemulab import Chain


def _statuses(vm: object) -> list[str]:
    return [j["status"] for j in vm.execute_sync("query-jobs")]  # type: ignore[attr-defined]


def test_a_no_wait_job_holding_the_disk_is_named_with_its_command_then_the_pull_runs(
    ns: Namespace, agent: AgentProcess, chain_factory: Callable[..., Chain], vm_in: VMFactory
) -> None:
    chain = chain_factory(layers=3, size=32 * MiB, pattern="spread", data_bytes=8 * MiB)
    vm = vm_in("web-1", [chain], extra_monitors=1)
    socket = str(vm.extra_sockets[0])
    started = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockpull.cli",
            "pull",
            socket,
            vm.disks[0].top,
            "--no-wait",
            "--job-id",
            "left",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started
    eventually(lambda: _statuses(vm) == ["pending"], what="the CLI's job waits at pending")

    ns.create("blocked", nodeName="node-a", vm="web-1", disk=vm.disks[0].top)
    status = ns.wait_reason("blocked", "Pending", "DiskBusy")
    message = status["message"]
    assert "stream job left (copy done, waiting to be finalized)" in message, message
    assert "it has ended and nobody collected it" in message
    collect = message.split("run `", 1)[1].split("`", 1)[0]
    assert collect.startswith("blockpull wait ") and collect.endswith(" left"), collect
    assert "against a QMP monitor of the VM other than the agent's" in message
    assert _statuses(vm) == ["pending"], "the agent never touches another client's job"

    # The admin runs the one command (against a monitor of their own), and the pull proceeds.
    ran = subprocess.run(
        [sys.executable, "-m", "blockpull.cli", "wait", socket, "left"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran
    done = ns.wait_phase("blocked", "Completed", "Failed", timeout=30)
    assert done["phase"] == "Completed", done
    vm.stop_sync()
    assert_flattened(chain)


def test_the_job_of_an_object_deleted_while_qemu_was_frozen_is_collected_by_the_agent(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain], extra_monitors=1)
    ns.create("hung", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    job_id = ns.wait_phase("hung", "Running")["jobId"]
    vm.kill(signal.SIGSTOP, wait=False)
    try:
        ns.delete("hung")
        ns.wait_gone("hung", timeout=30)
        ns.wait_event("hung", "AbortUnconfirmed")
    finally:
        vm.kill(signal.SIGCONT, wait=False)
    # QEMU carries on with the job nobody owns any more; it copies and waits at pending.
    vm.execute_sync("block-job-set-speed", {"device": job_id, "speed": 0})
    eventually(lambda: _statuses(vm) == ["pending"], timeout=30, what="orphan pending")

    ns.create("again", nodeName="node-a", vm="web-1", disk=vm.disks[0].top)
    done = ns.wait_phase("again", "Completed", "Failed", timeout=60)
    assert done["phase"] == "Completed", done
    assert f"collected job {job_id} of a deleted BlockPull (cancelled)" in agent.log()
    vm.stop_sync()
    assert_flattened(slow_chain)


def test_a_bandwidth_edit_made_while_the_agent_was_down_is_applied_and_said(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain], extra_monitors=1)
    ns.create("edited", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, bandwidth="1Mi")
    job_id = ns.wait_phase("edited", "Running")["jobId"]
    agent.kill()
    ns.patch_spec("edited", bandwidth="2Mi")
    time.sleep(0.5)
    assert vm.execute_sync("query-block-jobs")[0]["speed"] == 1 * MiB
    agent.start()
    eventually(lambda: vm.execute_sync("query-block-jobs")[0]["speed"] == 2 * MiB, what="speed applied")
    ns.wait_event("edited", "BandwidthChanged")
    assert f"re-attached to job {job_id}" in agent.log()
    assert "bandwidth 1.0 MiB/s -> 2.0 MiB/s" in agent.log()
    ns.patch_spec("edited", bandwidth=0)
    assert ns.wait_phase("edited", "Completed", "Failed")["phase"] == "Completed"


MiB = 1 << 20
