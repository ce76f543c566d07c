"""Node scheduling with the agent process and real QEMUs, judged from QEMU's own view.

BLOCKPULL_MAX_CONCURRENT: never more jobs alive in QEMU than the limit (sampled from every
VM's `query-block-jobs`, not from the status), the rest Pending/Queued with their place,
started in creation order; a paused job keeps its slot; a deleted queued object never reaches
its VM; deadlines count while queued; a restarted agent rebuilds the queue without starting
more than the limit. BLOCKPULL_NODE_BANDWIDTH: QEMU's job speeds and `status.bandwidth`
follow the max-min split at each step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import (
    AgentProcess,
    Namespace,
    Scrape,
    VMFactory,
    assert_flattened,
    assert_intact,
    eventually,
)

from qemulab import Chain

MiB = 1 << 20
AgentFactory = Callable[..., AgentProcess]


class JobSampler:
    """Polls every VM's `query-block-jobs` from the test's own monitor, every 50 ms."""

    def __init__(self, vms: dict[str, Any]) -> None:
        self.vms = vms
        self.most_alive = 0
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def alive(self) -> list[str]:
        return sorted(name for name, vm in self.vms.items() if vm.execute_sync("query-block-jobs"))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alive = self.alive()
            except Exception:  # a VM being stopped at teardown
                return
            now = time.monotonic()
            self.most_alive = max(self.most_alive, len(alive))
            for name in alive:
                self.first_seen.setdefault(name, now)
            time.sleep(0.05)

    def start_order(self) -> list[str]:
        return sorted(self.first_seen, key=lambda name: (self.first_seen[name], name))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def sampler() -> Iterator[Callable[[dict[str, Any]], JobSampler]]:
    samplers: list[JobSampler] = []

    def factory(vms: dict[str, Any]) -> JobSampler:
        samplers.append(JobSampler(vms))
        return samplers[-1]

    yield factory
    for one in samplers:
        one.stop()


def vms_with_chains(
    count: int, chain_factory: Callable[..., Chain], vm_in: VMFactory, *, data_mib: int = 8
) -> tuple[dict[str, Any], dict[str, Chain]]:
    chains = {
        f"p{i}": chain_factory(
            layers=2, size=max(64, 2 * data_mib) * MiB, pattern="spread", data_bytes=data_mib * MiB
        )
        for i in range(1, count + 1)
    }
    vms = {name: vm_in(f"vm-{name}", [chain]) for name, chain in chains.items()}
    return vms, chains


def test_a_limit_of_two_keeps_five_pulls_two_at_a_time_in_creation_order(
    ns: Namespace,
    agent_factory: AgentFactory,
    chain_factory: Callable[..., Chain],
    vm_in: VMFactory,
    sampler: Callable[[dict[str, Any]], JobSampler],
) -> None:
    agent = agent_factory(BLOCKPULL_MAX_CONCURRENT="2")
    vms, chains = vms_with_chains(5, chain_factory, vm_in)
    jobs = sampler(vms)
    for name, chain in chains.items():  # p1..p5: creation order (and name order within a second)
        ns.create(name, nodeName="node-a", vm=f"vm-{name}", disk=str(chain.top), bandwidth="4Mi")

    queued = ns.wait_reason("p5", "Pending", "Queued", timeout=15)
    assert queued["message"].endswith("; 2 ahead of it"), queued["message"]
    assert ns.condition("p5", "Reconciling")["reason"] == "Queued"
    eventually(
        lambda: Scrape(agent).value("blockpull_jobs_queued", "blockpull_jobs_queued", node="node-a") == 3,
        timeout=10,
        what="3 queued in the metrics",
    )
    for name in chains:
        assert ns.wait_phase(name, "Completed", "Failed", timeout=90)["phase"] == "Completed", name
    jobs.stop()
    assert jobs.most_alive == 2, "never more than two jobs in QEMU at once, and two in parallel"
    assert jobs.start_order() == list(chains), jobs.first_seen
    for name, vm in vms.items():
        vm.stop_sync()
        assert_flattened(chains[name])


def test_a_paused_job_keeps_its_slot_and_a_deleted_queued_object_never_reaches_qemu(
    ns: Namespace,
    agent_factory: AgentFactory,
    chain_factory: Callable[..., Chain],
    vm_in: VMFactory,
    sampler: Callable[[dict[str, Any]], JobSampler],
) -> None:
    agent_factory(BLOCKPULL_MAX_CONCURRENT="1")
    vms, chains = vms_with_chains(3, chain_factory, vm_in)
    jobs = sampler(vms)
    ns.create("p1", nodeName="node-a", vm="vm-p1", disk=str(chains["p1"].top), bandwidth="1Mi")
    ns.wait_phase("p1", "Running")
    ns.patch_spec("p1", paused=True)
    ns.wait_phase("p1", "Paused", timeout=10)
    ns.create("p2", nodeName="node-a", vm="vm-p2", disk=str(chains["p2"].top))
    ns.create("p3", nodeName="node-a", vm="vm-p3", disk=str(chains["p3"].top), activeDeadlineSeconds=4)
    assert ns.wait_reason("p2", "Pending", "Queued")["message"].endswith("; 0 ahead of it")
    time.sleep(1.5)
    assert jobs.alive() == ["p1"], "the paused job keeps the one slot"

    started = time.monotonic()
    ns.delete("p2")
    ns.wait_gone("p2", timeout=5)
    assert time.monotonic() - started < 3, "a queued object goes at once"
    # The deadline counts while queued: p3 fails without ever reaching its VM.
    failed = ns.wait_phase("p3", "Failed", timeout=15)
    assert failed["reason"] == "DeadlineExceeded", failed
    assert "Queued" in failed["message"] or "ahead of it" in failed["message"], failed["message"]

    ns.patch_spec("p1", paused=False, bandwidth=0)
    assert ns.wait_phase("p1", "Completed", "Failed", timeout=30)["phase"] == "Completed"
    jobs.stop()
    assert set(jobs.first_seen) == {"p1"}, "no job was ever started for p2 or p3"
    for vm in vms.values():
        vm.stop_sync()
    assert_flattened(chains["p1"])
    assert_intact(chains["p2"])
    assert_intact(chains["p3"])


def test_an_agent_restart_rebuilds_the_queue_without_exceeding_the_limit(
    ns: Namespace,
    agent_factory: AgentFactory,
    chain_factory: Callable[..., Chain],
    vm_in: VMFactory,
    sampler: Callable[[dict[str, Any]], JobSampler],
) -> None:
    agent = agent_factory(BLOCKPULL_MAX_CONCURRENT="2")
    vms, chains = vms_with_chains(4, chain_factory, vm_in)
    jobs = sampler(vms)
    for name, chain in chains.items():
        ns.create(name, nodeName="node-a", vm=f"vm-{name}", disk=str(chain.top), bandwidth="1Mi")
    ns.wait_reason("p4", "Pending", "Queued", timeout=15)
    assert jobs.alive() == ["p1", "p2"]

    agent.kill()
    agent.start()
    time.sleep(3)  # the new agent re-attaches p1 and p2 and lists p3 and p4 again
    assert jobs.alive() == ["p1", "p2"]
    assert ns.status("p3")["reason"] == "Queued" and ns.status("p4")["reason"] == "Queued"
    for name in ("p1", "p2"):
        ns.patch_spec(name, bandwidth=0)
    for name in chains:
        assert ns.wait_phase(name, "Completed", "Failed", timeout=90)["phase"] == "Completed", name
    jobs.stop()
    assert jobs.most_alive == 2
    assert jobs.start_order()[2:] == ["p3", "p4"]
    for name, vm in vms.items():
        vm.stop_sync()
        assert_flattened(chains[name])


def test_a_node_budget_of_8mi_is_shared_max_min_and_follows_starts_pauses_edits_and_ends(
    ns: Namespace, agent_factory: AgentFactory, chain_factory: Callable[..., Chain], vm_in: VMFactory
) -> None:
    agent_factory(BLOCKPULL_MAX_CONCURRENT="0", BLOCKPULL_NODE_BANDWIDTH="8Mi")
    # Enough data that no job ends during the steps (at most 8 MiB/s for ~20 s).
    vms, chains = vms_with_chains(3, chain_factory, vm_in, data_mib=128)

    def qemu_speeds() -> dict[str, int]:
        speeds = {}
        for name, vm in vms.items():
            for job in vm.execute_sync("query-block-jobs"):
                speeds[name] = job["speed"]
        return speeds

    def agree(expected: dict[str, int]) -> None:
        """QEMU's speeds and status.bandwidth both show `expected`."""
        eventually(lambda: qemu_speeds() == expected, timeout=10, what=f"QEMU speeds {expected}")
        eventually(
            lambda: {name: ns.status(name).get("bandwidth") for name in expected} == expected,
            timeout=10,
            what=f"status.bandwidth {expected}",
        )

    ns.create("p1", nodeName="node-a", vm="vm-p1", disk=str(chains["p1"].top))
    agree({"p1": 8 * MiB})
    ns.create("p2", nodeName="node-a", vm="vm-p2", disk=str(chains["p2"].top))
    agree({"p1": 4 * MiB, "p2": 4 * MiB})
    ns.create("p3", nodeName="node-a", vm="vm-p3", disk=str(chains["p3"].top), bandwidth="1Mi")
    agree({"p1": 7 * MiB // 2, "p2": 7 * MiB // 2, "p3": 1 * MiB})
    changed = ns.wait_event("p1", "BandwidthChanged")
    assert "share of the node's budget of 8.0 MiB/s" in changed["message"], changed

    ns.patch_spec("p2", paused=True)  # a paused job takes no share
    ns.wait_phase("p2", "Paused", timeout=10)
    eventually(lambda: qemu_speeds()["p1"] == 7 * MiB, timeout=10, what="p1 takes p2's share")
    ns.patch_spec("p2", paused=False)
    agree({"p1": 7 * MiB // 2, "p2": 7 * MiB // 2, "p3": 1 * MiB})
    ns.patch_spec("p3", bandwidth="2Mi")  # a spec edit re-balances
    agree({"p1": 3 * MiB, "p2": 3 * MiB, "p3": 2 * MiB})
    ns.delete("p1")  # a job that ends gives its share back
    ns.wait_gone("p1", timeout=15)
    agree({"p2": 6 * MiB, "p3": 2 * MiB})
    for name in ("p2", "p3"):
        ns.delete(name)
        ns.wait_gone(name, timeout=15)
    for name, vm in vms.items():
        vm.stop_sync()
        assert_intact(chains[name])
