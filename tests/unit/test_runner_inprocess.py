"""The agent in-process: the real Agent, runners, reporters and protocol sequences over a fake
driver and a recording Kubernetes API, on controlled time (looptime: the event loop's clock
fast-forwards whenever the agent waits, and the agent's wall clock follows it), with the
production intervals. Covers what the process tests cannot pin down cheaply: the order of the
durable end, the once-only warnings, the collection of an orphaned job, and what hours of
waiting cost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from blockpull.agent.manager import Agent
from blockpull.agent.settings import AgentSettings
from blockpull.agent.status import is_terminal
from blockpull.driver import StreamRequest

from .fakes import FakeDriver, FakeKube, FakeVMs, MiB, body, eventually, loop_clock

pytestmark = pytest.mark.looptime


@pytest.fixture
async def world() -> AsyncIterator[tuple[Agent, FakeKube, FakeDriver]]:
    settings = AgentSettings.from_env({"NODE_NAME": "node-a", "BLOCKPULL_LIVENESS_PORT": "0"})
    kube, driver = FakeKube(), FakeDriver()
    agent = Agent(settings, kube, FakeVMs({"web-1": driver}), clock=loop_clock())  # type: ignore[arg-type]
    await agent.start()
    yield agent, kube, driver
    async with asyncio.timeout(10):  # a shutdown that hangs fails the test instead
        await agent.shutdown()


async def test_the_durable_end_finalizes_before_recording_and_records_before_dismissing(
    world: tuple[Agent, FakeKube, FakeDriver],
) -> None:
    agent, kube, driver = world
    agent.observe(body("p", "11111111-1111-1111-1111-111111111111"))
    job_id = "blockpull-11111111-1111-1111-1111-111111111111"
    await eventually(lambda: kube.statuses.get("p", {}).get("phase") == "Running", what="Running")
    assert kube.statuses["p"]["progress"] == "0.00%", "a progress from the first write on"
    driver.advance(job_id, 32 * MiB)
    await eventually(lambda: kube.statuses["p"].get("progress") == "50.00%", what="progress")

    statuses_at_finalize: list[str] = []
    finalize = driver.finalize

    async def observed_finalize(job: str, device: str | None) -> None:
        statuses_at_finalize.append(kube.statuses["p"]["phase"])
        await finalize(job, device)

    driver.finalize = observed_finalize  # type: ignore[method-assign]
    driver.finish_copy(job_id)
    await eventually(lambda: is_terminal(kube.statuses["p"]), what="outcome")

    status = kube.statuses["p"]
    assert status["phase"] == "Completed" and status["releasedImages"] == [
        "/img/mid.qcow2",
        "/img/base.qcow2",
    ]
    assert statuses_at_finalize == ["Running"], "no outcome (nor releasedImages) before the chain changed"
    assert [c for c in driver.calls if c[0] in ("finalize", "dismiss")] == [
        ("finalize", job_id),
        ("dismiss", job_id),
    ]
    assert driver.jobs == {}
    assert kube.reasons("p") == ["Started", "Completed"]


async def test_an_invalid_edit_warns_once_and_says_so_in_the_status(
    world: tuple[Agent, FakeKube, FakeDriver],
) -> None:
    agent, kube, driver = world
    uid = "22222222-2222-2222-2222-222222222222"
    agent.observe(body("p", uid, bandwidth="1Mi"))
    await eventually(lambda: kube.statuses.get("p", {}).get("phase") == "Running", what="Running")
    # A CRD without the int64 bound lets this through; every status write brings it back.
    for _ in range(5):
        agent.observe(body("p", uid, generation=2, status=kube.statuses["p"], bandwidth="100Ei"))
    await eventually(lambda: "not applied" in kube.statuses["p"]["message"], what="reason in status")
    assert kube.reasons("p").count("InvalidSpec") == 1
    assert (
        "spec generation 2 not applied: bandwidth '100Ei' is larger than QEMU accepts"
        in (kube.statuses["p"]["message"])
    )
    assert driver.jobs[f"blockpull-{uid}"].speed == 1 * MiB, "the job keeps the last valid spec"

    agent.observe(body("p", uid, generation=3, status=kube.statuses["p"], bandwidth="2Mi"))
    await eventually(lambda: driver.jobs[f"blockpull-{uid}"].speed == 2 * MiB, what="valid edit applied")
    await eventually(lambda: "not applied" not in kube.statuses["p"]["message"], what="reason cleared")
    assert kube.reasons("p").count("InvalidSpec") == 1


async def test_an_ended_job_of_a_deleted_object_is_collected_and_the_new_pull_runs(
    world: tuple[Agent, FakeKube, FakeDriver],
) -> None:
    agent, kube, driver = world
    # Left by an object deleted while QEMU was frozen (AbortUnconfirmed): held at `pending`.
    orphan = "blockpull-33333333-3333-3333-3333-333333333333"
    await driver.start(_request(orphan))
    driver.finish_copy(orphan)
    agent.observe(body("new", "44444444-4444-4444-4444-444444444444"))
    await eventually(lambda: kube.statuses.get("new", {}).get("phase") == "Running", what="Running")
    # Deletion asked for an abort: the held job was cancelled (chain unchanged), then dismissed.
    assert ("cancel", orphan) in driver.calls and ("dismiss", orphan) in driver.calls
    assert ("finalize", orphan) not in driver.calls


async def test_a_job_of_another_client_is_named_with_the_command_that_collects_it(
    world: tuple[Agent, FakeKube, FakeDriver],
) -> None:
    agent, kube, driver = world
    await driver.start(_request("blockpull-0a1b2c3d"))  # a `blockpull pull --no-wait` job
    driver.finish_copy("blockpull-0a1b2c3d")
    agent.observe(body("p", "55555555-5555-5555-5555-555555555555"))
    await eventually(lambda: kube.statuses.get("p", {}).get("reason") == "DiskBusy", what="DiskBusy")
    message = kube.statuses["p"]["message"]
    assert "blockpull-0a1b2c3d (copy done, waiting to be finalized)" in message
    assert "it has ended and nobody collected it" in message and "collect blockpull-0a1b2c3d" in message
    assert ("dismiss", "blockpull-0a1b2c3d") not in driver.calls, "never another client's job"


def _request(job_id: str) -> StreamRequest:
    return StreamRequest(disk="vda", job_id=job_id)


async def test_an_hour_waiting_for_a_vm_costs_three_status_writes_then_the_deadline_and_ttl_hold(
    world: tuple[Agent, FakeKube, FakeDriver],
) -> None:
    """On controlled time: an hour of retries against an absent VM (backoff capped at 5 s)
    writes the status three times in all; the deadline fails it at 3600 s after creation, and
    the TTL deletes it 600 s after its completionTime."""
    agent, kube, _ = world
    loop = asyncio.get_running_loop()
    uid = "66666666-6666-6666-6666-666666666666"
    agent.observe(body("p", uid, vm="web-9", activeDeadlineSeconds=3600, ttlSecondsAfterFinished=600))
    await eventually(lambda: kube.statuses.get("p", {}).get("reason") == "WaitingForVM", what="waiting")
    await eventually(lambda: is_terminal(kube.statuses["p"]), timeout=4000, what="the deadline")
    failed_at = loop.time()
    assert kube.statuses["p"]["reason"] == "DeadlineExceeded"
    assert 3600 <= failed_at < 3600 + 6, failed_at  # within one capped backoff of the deadline
    # Starting (unless WaitingForVM superseded it before it was sent), WaitingForVM, Failed.
    assert kube.writes_of["p"] <= 3, "no rewrite per retry"
    assert kube.statuses["p"]["completionTime"] == "2026-12-04T11:00:00Z"

    agent.observe(body("p", uid, status=kube.statuses["p"], vm="web-9", ttlSecondsAfterFinished=600))
    await eventually(lambda: kube.writes["delete"] == 1, timeout=700, what="the TTL delete")
    assert 3600 + 600 <= loop.time() < 3600 + 602


@pytest.mark.parametrize("noticed_by", ["a status write (404)", "the watch (DELETED)"])
async def test_an_object_deleted_before_its_finalizer_landed_has_its_job_cancelled(
    world: tuple[Agent, FakeKube, FakeDriver], noticed_by: str
) -> None:
    """kopf adds the finalizer with a patch that loses to a concurrent status write; a delete
    in that moment removes the object at once, with no abort. The job must not run on
    unobserved (and then hold the disk at `pending`): the agent cancels it all the same."""
    agent, kube, driver = world
    uid = "77777777-7777-7777-7777-777777777777"
    job_id = f"blockpull-{uid}"
    agent.observe(body("p", uid))
    await eventually(lambda: kube.statuses.get("p", {}).get("phase") == "Running", what="Running")
    kube.gone.add("p")
    if noticed_by == "the watch (DELETED)":
        agent.forget(uid)
    driver.advance(job_id, 8 * MiB)  # the next progress write meets the 404
    await eventually(lambda: job_id not in driver.jobs, what="the job cancelled and dismissed")
    assert ("cancel", job_id) in driver.calls and ("finalize", job_id) not in driver.calls
    assert kube.reasons("p")[-1] == "Cancelled"
    assert agent.active == 0 and agent.scheduler.holders == 0
