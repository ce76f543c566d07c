"""Node scheduling with the agent process and real QEMUs, judged from QEMU's own view.

BLOCKPULL_MAX_CONCURRENT: never more jobs alive in QEMU than the limit (from each QEMU's own job
events, created to dismissed, not from the status), the rest Pending/Queued with their place,
started in creation order; a paused job keeps its slot; a deleted queued object never reaches
its VM; deadlines count while queued; a restarted agent rebuilds the queue without starting
more than the limit. BLOCKPULL_NODE_BANDWIDTH: QEMU's job speeds and `status.bandwidth`
follow the max-min split at each step."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import (
    AgentProcess,
    JobEvents,
    Namespace,
    Scrape,
    VMFactory,
    assert_flattened,
    assert_intact,
    eventually,
)

from qemulab import Chain

MiB = 1 << 20
#: How far apart in QEMU two jobs granted a slot at the same moment may start (see
#: `JobTimeline.assert_started_in_order`); a job here runs for two seconds or more.
START_RACE = 1.0
AgentFactory = Callable[..., AgentProcess]


class JobTimeline:
    """Every VM's jobs as QEMU itself reports them: JOB_STATUS_CHANGE events on a monitor of the
    test's own, a job alive from `created` to `null` (dismissed) by QEMU's timestamps, which every
    VM takes from the host's clock. Exact where polling the VMs in turn is not: one sweep can
    see a job just before its dismissal and the next job just after its start, and count both."""

    def __init__(self, vms: dict[str, Any]) -> None:
        self.vms = vms
        self._events = {name: JobEvents(vm.extra_sockets[0]) for name, vm in vms.items()}

    def alive(self) -> list[str]:
        """The VMs with a job now, asked of each QEMU (`query-block-jobs`)."""
        return sorted(name for name, vm in self.vms.items() if vm.execute_sync("query-block-jobs"))

    def lifetimes(self) -> list[tuple[float, float, str]]:
        """(created, dismissed or inf, VM) of every job, QEMU's clock."""
        spans: list[tuple[float, float, str]] = []
        for name, events in self._events.items():
            created: float | None = None
            for event in events.watcher.events("JOB_STATUS_CHANGE"):
                assert event.qemu_time is not None, event
                if event.data.get("status") == "created":
                    created = event.qemu_time
                elif event.data.get("status") == "null" and created is not None:
                    spans.append((created, event.qemu_time, name))
                    created = None
            if created is not None:
                spans.append((created, math.inf, name))
        return spans

    def all_dismissed(self) -> bool:
        return all(end != math.inf for _, end, _ in self.lifetimes())

    def most_alive(self) -> int:
        # At equal times an end sorts before a start: a slot handed over within QEMU's
        # microsecond is not an overlap.
        spans = self.lifetimes()
        edges = sorted([(start, 1) for start, _, _ in spans] + [(end, -1) for _, end, _ in spans])
        alive = most = 0
        for _, step in edges:
            alive += step
            most = max(most, alive)
        return most

    def start_order(self) -> list[str]:
        return list(self.first_starts())

    def first_starts(self) -> dict[str, float]:
        """When each VM's first job was created, earliest first."""
        first: dict[str, float] = {}
        for start, _, name in sorted(self.lifetimes()):
            first.setdefault(name, start)
        return first

    def assert_started_in_order(self, names: list[str]) -> None:
        """Each of `names` started no earlier than the ones before it, give or take
        START_RACE: objects granted a slot together go to their VMs in parallel, and which
        job QEMU creates first is then a race (the scheduler orders grants, not QMP round
        trips). A grant out of order shows as a whole job's run (seconds) out of order."""
        starts = self.first_starts()
        for earlier, later in itertools.combinations(names, 2):
            assert starts[later] + START_RACE >= starts[earlier], (earlier, later, self.lifetimes())

    def close(self) -> None:
        for events in self._events.values():
            events.close()


@pytest.fixture
def timeline() -> Iterator[Callable[[dict[str, Any]], JobTimeline]]:
    timelines: list[JobTimeline] = []

    def factory(vms: dict[str, Any]) -> JobTimeline:
        timelines.append(JobTimeline(vms))
        return timelines[-1]

    yield factory
    for one in timelines:
        one.close()


def vms_with_chains(
    count: int, chain_factory: Callable[..., Chain], vm_in: VMFactory, *, data_mib: int = 8
) -> tuple[dict[str, Any], dict[str, Chain]]:
    chains = {
        f"p{i}": chain_factory(
            layers=2, size=max(64, 2 * data_mib) * MiB, pattern="spread", data_bytes=data_mib * MiB
        )
        for i in range(1, count + 1)
    }
    # A second monitor each, for the test's JobTimeline.
    vms = {name: vm_in(f"vm-{name}", [chain], extra_monitors=1) for name, chain in chains.items()}
    return vms, chains


def test_a_limit_of_two_keeps_five_pulls_two_at_a_time_in_creation_order(
    ns: Namespace,
    agent_factory: AgentFactory,
    chain_factory: Callable[..., Chain],
    vm_in: VMFactory,
    timeline: Callable[[dict[str, Any]], JobTimeline],
) -> None:
    agent = agent_factory(BLOCKPULL_MAX_CONCURRENT="2")
    vms, chains = vms_with_chains(5, chain_factory, vm_in)
    jobs = timeline(vms)
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
    eventually(jobs.all_dismissed, what="every job dismissed")
    # Never more than two jobs in QEMU at once, and two in parallel.
    assert jobs.most_alive() == 2, jobs.lifetimes()
    jobs.assert_started_in_order(list(chains))
    for name, vm in vms.items():
        vm.stop_sync()
        assert_flattened(chains[name])


def test_a_paused_job_keeps_its_slot_and_a_deleted_queued_object_never_reaches_qemu(
    ns: Namespace,
    agent_factory: AgentFactory,
    chain_factory: Callable[..., Chain],
    vm_in: VMFactory,
    timeline: Callable[[dict[str, Any]], JobTimeline],
) -> None:
    agent_factory(BLOCKPULL_MAX_CONCURRENT="1")
    vms, chains = vms_with_chains(3, chain_factory, vm_in)
    jobs = timeline(vms)
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
    eventually(jobs.all_dismissed, what="every job dismissed")
    assert jobs.start_order() == ["p1"], ("no job was ever started for p2 or p3", jobs.lifetimes())
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
    timeline: Callable[[dict[str, Any]], JobTimeline],
) -> None:
    agent = agent_factory(BLOCKPULL_MAX_CONCURRENT="2")
    vms, chains = vms_with_chains(4, chain_factory, vm_in)
    jobs = timeline(vms)
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
    eventually(jobs.all_dismissed, what="every job dismissed")
    assert jobs.most_alive() == 2, jobs.lifetimes()
    assert sorted(jobs.start_order()[:2]) == ["p1", "p2"], jobs.lifetimes()
    jobs.assert_started_in_order(list(chains))
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
