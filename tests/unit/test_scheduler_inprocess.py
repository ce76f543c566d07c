"""Node scheduling in-process, on controlled time (looptime) with the production intervals:
the real Agent, runners and scheduler over fake VMs (one disk each) and a recording API. The
process tests with real QEMUs show the same on QEMU's side; these pin down what is cheap to
check exhaustively here: the writes of queued objects, the start order, a deadline while
queued, and the rebuild after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from blockpull.agent.manager import Agent
from blockpull.agent.settings import AgentSettings
from blockpull.agent.status import is_terminal
from blockpull.driver import StreamRequest

from .fakes import FakeDriver, FakeKube, FakeVMs, MiB, body, eventually, loop_clock

pytestmark = pytest.mark.looptime

VMS = [f"web-{i}" for i in range(1, 6)]
World = tuple[Agent, FakeKube, dict[str, FakeDriver]]
MakeWorld = Callable[..., Any]


def uid(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012d}"


def job(i: int) -> str:
    return f"blockpull-{uid(i)}"


def pull(
    i: int, *, minute: int | None = None, status: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    """Object p<i> on VM web-<i>, created at minute `minute` (default i)."""
    obj = body(f"p{i}", uid(i), status=status, vm=f"web-{i}", **spec)
    obj["metadata"]["creationTimestamp"] = f"2026-12-04T10:{minute if minute is not None else i:02d}:00Z"
    return obj


@pytest.fixture
async def make_world() -> AsyncIterator[MakeWorld]:
    agents: list[Agent] = []

    async def make(kube: FakeKube | None = None, **env: str) -> World:
        settings = AgentSettings.from_env({"NODE_NAME": "node-a", "BLOCKPULL_LIVENESS_PORT": "0", **env})
        drivers = {vm: FakeDriver() for vm in VMS}
        kube = kube or FakeKube()
        agent = Agent(settings, kube, FakeVMs(dict(drivers)), clock=loop_clock())  # type: ignore[arg-type]
        agents.append(agent)
        await agent.start()
        return agent, kube, drivers

    yield make
    for agent in agents:
        async with asyncio.timeout(10):
            await agent.shutdown()


def alive(drivers: dict[str, FakeDriver]) -> list[str]:
    return sorted(vm for vm, d in drivers.items() if any(not j.concluded for j in d.jobs.values()))


def phase(kube: FakeKube, name: str) -> tuple[str | None, str | None]:
    status = kube.statuses.get(name, {})
    return status.get("phase"), status.get("reason")


async def test_a_limit_of_two_runs_five_objects_two_at_a_time_in_creation_order(
    make_world: MakeWorld,
) -> None:
    agent, kube, drivers = await make_world(BLOCKPULL_MAX_CONCURRENT="2")
    # Seen in another order than created (as a watch may deliver them).
    for i in (3, 1, 5, 2, 4):
        agent.observe(pull(i))
    await eventually(lambda: alive(drivers) == ["web-1", "web-3"], what="the first two started")
    # Objects 1 and 3 were observed first and took both slots; the others wait with their place.
    for i in (2, 4, 5):
        await eventually(lambda i=i: phase(kube, f"p{i}") == ("Pending", "Queued"), what=f"p{i} queued")
    messages = {i: kube.statuses[f"p{i}"]["message"] for i in (2, 4, 5)}
    # Places when queued: p5 came first (alone), then p2 (before it), then p4 (after p2).
    assert messages[2].endswith("; 0 ahead of it") and messages[4].endswith("; 1 ahead of it")
    assert "BLOCKPULL_MAX_CONCURRENT" in messages[2]
    writes_while_queued = {i: _writes(kube, i) for i in (2, 4, 5)}

    started: list[str] = []
    for step in range(5):
        running = alive(drivers)
        assert len(running) <= 2, running
        for vm in running:
            if vm not in started:
                started.append(vm)
        # Finish the earliest-created running job; the next in creation order starts.
        first = min(running, key=lambda vm: int(vm.split("-")[1]))
        i = int(first.split("-")[1])
        drivers[first].finish_copy(job(i))
        await eventually(lambda i=i: is_terminal(kube.statuses[f"p{i}"]), what=f"p{i} done")
        if step < 4:
            want = min(2, 4 - step)
            await eventually(lambda want=want: len(alive(drivers)) == want, what="the next start")
    assert started == ["web-1", "web-3", "web-2", "web-4", "web-5"]
    assert all(kube.statuses[f"p{i}"]["phase"] == "Completed" for i in range(1, 6))
    # A queued object's status is written once: the place is not rewritten as the queue moves.
    assert writes_while_queued == {2: 1, 4: 1, 5: 1}


def _writes(kube: FakeKube, i: int) -> int:
    return kube.writes_of.get(f"p{i}", 0)


async def test_a_deleted_queued_object_never_reaches_its_vm(make_world: MakeWorld) -> None:
    agent, kube, drivers = await make_world(BLOCKPULL_MAX_CONCURRENT="1")
    agent.observe(pull(1))
    agent.observe(pull(2))
    await eventually(lambda: phase(kube, "p2") == ("Pending", "Queued"), what="p2 queued")
    async with asyncio.timeout(2):
        await agent.delete(pull(2))
    drivers["web-1"].finish_copy(job(1))
    await eventually(lambda: is_terminal(kube.statuses["p1"]), what="p1 done")
    await asyncio.sleep(0.3)
    assert drivers["web-2"].calls == [], "no QMP call at all for the deleted queued object"
    assert agent.scheduler.holders == 0 and agent.scheduler.waiting == 0


async def test_a_paused_job_keeps_its_slot_and_one_created_paused_holds_none(make_world: MakeWorld) -> None:
    agent, kube, drivers = await make_world(BLOCKPULL_MAX_CONCURRENT="1")
    agent.observe(pull(1, paused=True))  # created paused: no job, no slot
    await eventually(lambda: phase(kube, "p1") == ("Pending", "Paused"), what="p1 held")
    agent.observe(pull(2))
    await eventually(lambda: alive(drivers) == ["web-2"], what="p2 runs")
    agent.observe(pull(2, generation=2, paused=True))
    await eventually(lambda: phase(kube, "p2")[0] == "Paused", what="p2 paused")
    agent.observe(pull(3))
    await eventually(lambda: phase(kube, "p3") == ("Pending", "Queued"), what="p3 queued behind a paused job")
    agent.observe(pull(2, generation=3, paused=False))
    drivers["web-2"].finish_copy(job(2))
    await eventually(lambda: alive(drivers) == ["web-3"], what="p3 starts after p2")


async def test_deadlines_count_while_queued(make_world: MakeWorld) -> None:
    agent, kube, drivers = await make_world(BLOCKPULL_MAX_CONCURRENT="1")
    loop = asyncio.get_running_loop()
    agent.observe(pull(1, minute=0))
    agent.observe(pull(2, minute=0, activeDeadlineSeconds=600))  # created at the start of time
    await eventually(lambda: phase(kube, "p2") == ("Pending", "Queued"), what="p2 queued")
    await eventually(lambda: phase(kube, "p2")[0] == "Failed", timeout=700, what="deadline")
    assert phase(kube, "p2") == ("Failed", "DeadlineExceeded")
    assert 600 <= loop.time() < 601, "woken by the deadline itself, not by a poll"
    assert "ahead of it" in kube.statuses["p2"]["message"], "the message says what it waited for"
    assert drivers["web-2"].calls == [] and kube.writes_of["p2"] == 2, "Queued, Failed: nothing else"


async def test_a_restart_rebuilds_the_queue_before_granting_any_slot(make_world: MakeWorld) -> None:
    kube = FakeKube()
    running = {"phase": "Running", "jobId": job(4), "startTime": "2026-12-04T10:30:00Z"}
    # Objects 1-3 wait; 4 had a job started by the agent's earlier life; the limit is 1.
    kube.objects = [pull(i) for i in (1, 2, 3)] + [pull(4, status=running)]
    agent, kube, drivers = await make_world(kube, BLOCKPULL_MAX_CONCURRENT="1")
    drivers["web-4"].jobs[job(4)] = await _started(drivers["web-4"], job(4))
    assert agent.scheduler.holders == 1 and agent.scheduler.waiting == 3
    # The watch delivers the newest waiting object first: it must not take a slot.
    for obj in (pull(3), pull(4, status=running), pull(2), pull(1)):
        agent.observe(obj)
    await asyncio.sleep(0.3)
    assert alive(drivers) == ["web-4"], "the re-attached job holds the one slot"
    drivers["web-4"].finish_copy(job(4))
    await eventually(lambda: alive(drivers) == ["web-1"], what="the oldest starts next")


async def _started(driver: FakeDriver, job_id: str) -> Any:
    await driver.start(StreamRequest(disk="vda", job_id=job_id, base=None, bandwidth=0, on_error="report"))
    return driver.jobs[job_id]


async def test_a_bandwidth_budget_is_shared_max_min_and_rebalanced(make_world: MakeWorld) -> None:
    agent, kube, drivers = await make_world(BLOCKPULL_MAX_CONCURRENT="0", BLOCKPULL_NODE_BANDWIDTH="8Mi")

    def speeds() -> dict[int, int]:
        return {
            i: drivers[f"web-{i}"].jobs[job(i)].speed
            for i in range(1, 4)
            if job(i) in drivers[f"web-{i}"].jobs and not drivers[f"web-{i}"].jobs[job(i)].concluded
        }

    def status_bandwidths() -> dict[int, int]:
        return {i: kube.statuses[f"p{i}"].get("bandwidth") for i in speeds()}

    async def settle(expected: dict[int, int]) -> None:
        await eventually(lambda: speeds() == expected, what=f"speeds {expected}")
        await eventually(lambda: status_bandwidths() == expected, what=f"status.bandwidth {expected}")

    agent.observe(pull(1))
    await settle({1: 8 * MiB})
    agent.observe(pull(2))
    await settle({1: 4 * MiB, 2: 4 * MiB})
    agent.observe(pull(3, bandwidth="1Mi"))
    await settle({1: 7 * MiB // 2, 2: 7 * MiB // 2, 3: 1 * MiB})
    agent.observe(pull(2, generation=2, paused=True))  # a paused job takes no share
    await eventually(lambda: phase(kube, "p2")[0] == "Paused", what="p2 paused")
    await eventually(lambda: speeds()[1] == 7 * MiB, what="p1 gets p2's share")
    agent.observe(pull(3, generation=2, bandwidth="2Mi"))  # an edit re-balances
    await eventually(lambda: (speeds()[1], speeds()[3]) == (6 * MiB, 2 * MiB), what="edit")
    agent.observe(pull(2, generation=3, paused=False))
    await settle({1: 3 * MiB, 2: 3 * MiB, 3: 2 * MiB})
    drivers["web-1"].finish_copy(job(1))
    await eventually(lambda: is_terminal(kube.statuses["p1"]), what="p1 done")
    await settle({2: 6 * MiB, 3: 2 * MiB})
