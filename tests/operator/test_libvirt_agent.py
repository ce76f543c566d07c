"""BlockPulls of libvirt domains through a real agent process, a real private libvirtd, real
TCG domains and real chains (the agent with BLOCKPULL_LIBVIRT_URI set).

After each case the domain is untainted (the `domain_factory` fixture checks its log),
libvirt's live XML shows the real chain, and the images check out as their headers chain
them. The chains' data is compared once the domain is shut down (QEMU flushes then)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import AgentFactory, AgentProcess, Namespace, eventually

from qemulab import Chain
from qemulab.patterns import MiB
from qemulab.pytest_plugin import ChainFactory
from qemulab.tools import QEMU_IMG, run_tool
from virtlab import Domain, DomainDisk, LibvirtDaemon, assert_flattened, assert_intact, assert_relative_kept
from virtlab.pytest_plugin import DomainFactory

pytestmark = pytest.mark.libvirt

SLOW = 2 * MiB


@pytest.fixture
def lagent(agent_factory: AgentFactory, libvirtd_running: LibvirtDaemon) -> AgentProcess:
    """The agent of node-a, reaching libvirt domains of the lab's libvirtd."""
    return agent_factory(BLOCKPULL_LIBVIRT_URI=libvirtd_running.uri)


@pytest.fixture
def data_chain(chain_factory: ChainFactory) -> Chain:
    """24 MiB of data: at 2 MiB/s a pull takes ~12 s, time to act while it runs."""
    return chain_factory(layers=4, size=64 * MiB, pattern="spread", data_bytes=24 * MiB)


def _domain(domain_factory: DomainFactory, ns: Namespace, chain: Chain, vm: str = "web-1") -> Domain:
    return domain_factory(chain, namespace=ns.name, vm=vm)


def _no_job(domain: Domain) -> bool:
    info = domain.block_job_info()
    return info.strip() == "" or "No current block job" in info


def test_full_pull_by_target(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, chain4: Chain
) -> None:
    domain = _domain(domain_factory, ns, chain4)
    ns.create("flatten", nodeName="node-a", vm="web-1", disk="vda")
    status = ns.wait_phase("flatten", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    assert status["target"] == {"node": "vda"}
    assert status["offset"] == status["length"] == chain4.size and status["progress"] == "100.00%"
    assert status["releasedImages"] == [str(p) for p in reversed(chain4.images[:-1])]
    ns.assert_event_reasons("flatten", ["Started", "Completed"])
    assert _no_job(domain)
    assert_flattened(domain, chain4)
    domain.destroy()
    assert_flattened(None, chain4)


@pytest.mark.parametrize("by", ["path", "index"])
def test_pull_to_base_keeps_the_relative_name(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, chain4: Chain, by: str
) -> None:
    domain = _domain(domain_factory, ns, chain4)
    base = str(chain4.images[1]) if by == "path" else "vda[3]"
    ns.create("to-base", nodeName="node-a", vm="web-1", disk=str(chain4.top), base=base)
    status = ns.wait_phase("to-base", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    assert status["target"] == {"node": "vda", "base": "vda[3]"}
    assert status["releasedImages"] == [str(chain4.images[2])]
    assert_flattened(domain, chain4, keep=2)
    assert_relative_kept(chain4, keep=2)


def test_live_bandwidth_and_delete_cancels(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = _domain(domain_factory, ns, data_chain)
    ns.create("slow", nodeName="node-a", vm="web-1", disk="vda", bandwidth=SLOW)
    assert ns.wait_phase("slow", "Running")["bandwidth"] == SLOW
    ns.patch_spec("slow", bandwidth=SLOW // 2)
    eventually(lambda: ns.status("slow").get("bandwidth") == SLOW // 2, what="bandwidth applied")
    assert str(SLOW // 2) in domain.block_job_info()  # libvirt's own view, in bytes/s
    ns.wait_event("slow", "BandwidthChanged")
    ns.delete("slow")
    ns.wait_gone("slow")  # the finalizer went once libvirt confirmed the cancel
    assert _no_job(domain)
    assert_intact(domain, data_chain)


def test_paused_before_start_and_while_running(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = _domain(domain_factory, ns, data_chain)
    ns.create("held", nodeName="node-a", vm="web-1", disk="vda", bandwidth=SLOW, paused=True)
    status = ns.wait_phase("held", "Pending", "Paused")
    assert _no_job(domain)  # nothing started
    ns.patch_spec("held", paused=False)
    ns.wait_phase("held", "Running")
    ns.patch_spec("held", paused=True)
    warning = ns.wait_event("held", "PauseUnsupported")
    assert warning["type"] == "Warning" and "cannot pause" in warning["message"]
    status = ns.wait_reason("held", "Running", "PauseUnsupported")
    assert ns.condition("held", "Running")["reason"] == "PauseUnsupported"
    assert not _no_job(domain)  # the job keeps running
    ns.patch_spec("held", bandwidth=0)
    status = ns.wait_phase("held", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    assert_flattened(domain, data_chain)


def test_domain_absent_waits_then_runs(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, chain4: Chain
) -> None:
    domain = domain_factory.define(chain4, namespace=ns.name, vm="web-1")
    ns.create("later", nodeName="node-a", vm="web-1", disk="vda")
    status = ns.wait_reason("later", "Pending", "WaitingForVM")
    assert domain.name in status["message"]
    domain.create()
    status = ns.wait_phase("later", "Completed", "Failed", timeout=30)
    assert status["phase"] == "Completed", status
    assert_flattened(domain, chain4)


def test_busy_disk_waits_then_runs(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = _domain(domain_factory, ns, data_chain)
    domain.virsh("blockpull", domain.name, "vda", "--bandwidth", "1")  # someone else's job
    ns.create("second", nodeName="node-a", vm="web-1", disk="vda")
    status = ns.wait_reason("second", "Pending", "DiskBusy")
    assert f"stream job {domain.name}/vda (running" in status["message"]
    domain.virsh("blockjob", domain.name, "vda", "--abort")
    status = ns.wait_phase("second", "Completed", "Failed", timeout=30)
    assert status["phase"] == "Completed", status
    assert_flattened(domain, data_chain)


def test_deadline(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = _domain(domain_factory, ns, data_chain)
    ns.create("late", nodeName="node-a", vm="web-1", disk="vda", bandwidth=SLOW, activeDeadlineSeconds=3)
    status = ns.wait_phase("late", "Completed", "Failed", timeout=30)
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded"), status
    assert _no_job(domain)
    assert_intact(domain, data_chain)


def test_failed_job_says_libvirt_gives_no_text(
    ns: Namespace,
    lagent: AgentProcess,
    *,
    domain_factory: DomainFactory,
    chain_factory: ChainFactory,
    libvirtd_running: LibvirtDaemon,
    short_tmp: Path,
) -> None:
    chain = chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=24 * MiB)
    small = short_tmp / "small"
    host_view = libvirtd_running.mount_tmpfs(small, "2m")
    run_tool(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(chain.top),
            "-F",
            "qcow2",
            str(host_view / "t.qcow2"),
        ]
    )
    domain = domain_factory(disks=[DomainDisk("vda", small / "t.qcow2")], namespace=ns.name, vm="web-1")
    ns.create("enospc", nodeName="node-a", vm="web-1", disk="vda")
    status = ns.wait_phase("enospc", "Completed", "Failed", timeout=60)
    assert (status["phase"], status["reason"]) == ("Failed", "IOError"), (status, domain.log_text()[-3000:])
    assert "libvirt reports no error text" in status["message"] and "libvirtd" in status["message"]
    assert domain.xml_chain()[1:] == [str(p) for p in reversed(chain.images)]


def test_agent_killed_mid_job_reattaches(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = _domain(domain_factory, ns, data_chain)
    ns.create("survivor", nodeName="node-a", vm="web-1", disk="vda", bandwidth=SLOW)
    ns.wait_phase("survivor", "Running")
    ns.wait_event("survivor", "Started")
    lagent.kill()
    lagent.start()
    ns.patch_spec("survivor", bandwidth=0)
    status = ns.wait_phase("survivor", "Completed", "Failed", timeout=60)
    assert status["phase"] == "Completed", status
    assert ns.event_reasons("survivor").count("Started") == 1  # re-attached, never started twice
    assert "re-attached" in lagent.log()
    assert_flattened(domain, data_chain)


def test_job_finished_while_the_agent_was_away(
    ns: Namespace, lagent: AgentProcess, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = _domain(domain_factory, ns, data_chain)
    ns.create("away", nodeName="node-a", vm="web-1", disk="vda", bandwidth=SLOW)
    ns.wait_phase("away", "Running")
    lagent.kill()
    domain.virsh("blockjob", domain.name, "vda", "--bandwidth", "0")  # finishes at once
    eventually(lambda: domain.xml_chain() == [str(data_chain.top)], what="the pull to finish")
    lagent.start()
    status = ns.wait_phase("away", "Completed", "Failed", timeout=60)
    assert status["phase"] == "Completed", status
    assert_flattened(domain, data_chain)


def test_libvirtd_restarted_mid_job(
    ns: Namespace,
    lagent: AgentProcess,
    domain_factory: DomainFactory,
    data_chain: Chain,
    libvirtd_running: LibvirtDaemon,
) -> None:
    domain = _domain(domain_factory, ns, data_chain)
    ns.create("steady", nodeName="node-a", vm="web-1", disk="vda", bandwidth=SLOW)
    ns.wait_phase("steady", "Running")
    libvirtd_running.restart()
    ns.patch_spec("steady", bandwidth=0)
    status = ns.wait_phase("steady", "Completed", "Failed", timeout=60)
    assert status["phase"] == "Completed", status
    assert "reconnected" in lagent.log()
    assert_flattened(domain, data_chain)


def test_per_vm_daemon_through_a_uri_template(
    ns: Namespace,
    agent_factory: AgentFactory,
    *,
    libvirtd_running: LibvirtDaemon,
    domain_factory: DomainFactory,
    chain4: Chain,
    short_tmp: Path,
) -> None:
    """A KubeVirt-like launcher's daemon, reached through a per-VM socket path: here the path
    the template gives for (namespace, web-1) is a link to the lab's libvirtd socket."""
    per_vm = short_tmp / ns.name / "web-1"
    per_vm.mkdir(parents=True)
    (per_vm / "libvirt-sock").symlink_to(libvirtd_running.socket)
    uri = f"qemu+unix:///system?socket={short_tmp}/{{namespace}}/{{vm}}/libvirt-sock"
    agent = agent_factory(BLOCKPULL_LIBVIRT_URI=uri)
    domain = _domain(domain_factory, ns, chain4)
    ns.create("per-vm", nodeName="node-a", vm="web-1", disk="vda")
    ns.create("no-daemon", nodeName="node-a", vm="web-2", disk="vda")
    status = ns.wait_phase("per-vm", "Completed", "Failed")
    assert status["phase"] == "Completed", status
    waiting = ns.wait_reason("no-daemon", "Pending", "LibvirtUnavailable")
    assert f"{short_tmp}/{ns.name}/web-2/libvirt-sock" in waiting["message"]
    assert agent.alive
    assert_flattened(domain, chain4)


def test_node_slots_and_bandwidth_budget_hold_for_libvirt_domains(
    ns: Namespace,
    agent_factory: AgentFactory,
    libvirtd_running: LibvirtDaemon,
    domain_factory: DomainFactory,
    chain_factory: ChainFactory,
) -> None:
    """The scheduler is the same for both drivers: with one slot and a 4 MiB/s budget, the
    second domain's pull waits Queued with no job in libvirt, and each job runs at the whole
    budget, as libvirt itself reports."""
    agent_factory(
        BLOCKPULL_LIBVIRT_URI=libvirtd_running.uri,
        BLOCKPULL_MAX_CONCURRENT="1",
        BLOCKPULL_NODE_BANDWIDTH="4Mi",
    )
    chains = [chain_factory(layers=2, size=64 * MiB, pattern="spread", data_bytes=48 * MiB) for _ in range(2)]
    first = _domain(domain_factory, ns, chains[0], vm="web-1")
    second = _domain(domain_factory, ns, chains[1], vm="web-2")
    ns.create("first", nodeName="node-a", vm="web-1", disk="vda")
    assert ns.wait_phase("first", "Running")["bandwidth"] == 4 * MiB
    eventually(lambda: str(4 * MiB) in first.block_job_info(), what="libvirt's speed = the budget")
    ns.create("second", nodeName="node-a", vm="web-2", disk="vda")
    queued = ns.wait_reason("second", "Pending", "Queued")
    assert queued["message"].endswith("; 0 ahead of it")
    assert _no_job(second)

    ns.delete("first")  # its slot goes to the queued object
    ns.wait_gone("first")
    assert ns.wait_phase("second", "Running")["bandwidth"] == 4 * MiB
    eventually(lambda: str(4 * MiB) in second.block_job_info(), what="the second job at the budget")
    assert _no_job(first)
    ns.delete("second")
    ns.wait_gone("second")
    assert _no_job(second)
    assert_intact(first, chains[0])
    assert_intact(second, chains[1])
