"""The node scheduler's rules, pure: slots in creation order, places, holds after a restart,
and the max-min split of a bandwidth budget (the contract's "Node scheduling")."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from blockpull.agent.scheduler import NodeScheduler
from blockpull.agent.scheduling import QueueKey, SlotQueue, max_min_shares

MiB = 1 << 20
T0 = datetime.datetime(2026, 12, 4, 10, 0, tzinfo=datetime.UTC)


def key(minute: int, name: str = "p", namespace: str = "vms") -> QueueKey:
    return QueueKey(T0 + datetime.timedelta(minutes=minute), namespace, name)


# --- slots --------------------------------------------------------------------------------------


def test_a_limit_of_two_grants_two_and_queues_the_rest_in_creation_order() -> None:
    queue = SlotQueue(2)
    # Asked in another order than created: the queue is ordered by creation.
    assert queue.request("c", key(3)) == ["c"]
    assert queue.request("a", key(1)) == ["a"]
    assert queue.request("e", key(5)) == []
    assert queue.request("b", key(2)) == []
    assert queue.request("d", key(4)) == []
    assert [queue.ahead_of(uid) for uid in "bde"] == [0, 1, 2]
    assert queue.release("c") == ["b"]
    assert queue.release("a") == ["d"]
    assert queue.release("b") == ["e"]
    assert queue.waiting == 0 and queue.holders == 2


def test_creation_ties_go_by_namespace_then_name() -> None:
    queue = SlotQueue(1, is_open=False)
    queue.request("z", key(1, "a", "zz"))
    queue.request("y", key(1, "b", "aa"))
    queue.request("x", key(1, "a", "aa"))
    assert queue.open() == ["x"]
    assert queue.release("x") == ["y"]
    assert queue.release("y") == ["z"]


def test_a_closed_queue_grants_nothing_until_opened_and_held_jobs_count() -> None:
    queue = SlotQueue(2, is_open=False)
    queue.hold("running-1")
    assert queue.request("later", key(9)) == []
    assert queue.request("earlier", key(1)) == []
    assert queue.open() == ["earlier"], "one slot is held by the re-attached job"


def test_held_jobs_may_exceed_a_lowered_limit_and_block_new_starts() -> None:
    queue = SlotQueue(1)
    queue.hold("r1")
    queue.hold("r2")
    assert queue.request("new", key(1)) == []
    assert queue.release("r1") == [], "still one job over the limit"
    assert queue.release("r2") == ["new"]


def test_an_object_that_gives_its_slot_back_keeps_its_place() -> None:
    queue = SlotQueue(1)
    assert queue.request("first", key(1)) == ["first"]
    queue.request("second", key(2))
    queue.request("third", key(3))
    # `first` could not start (VM absent): its slot goes on, and when it asks again it is
    # put before the others again.
    assert queue.release("first") == ["second"]
    assert queue.request("first", key(1)) == []
    assert queue.ahead_of("first") == 0 and queue.ahead_of("third") == 1
    assert queue.release("second") == ["first"]


def test_a_waiter_that_leaves_frees_its_place_and_requests_are_idempotent() -> None:
    queue = SlotQueue(1)
    queue.request("a", key(1))
    queue.request("b", key(2))
    queue.request("c", key(3))
    assert queue.request("b", key(2)) == [] and queue.waiting == 2
    assert queue.release("b") == [], "b only waited: no slot freed"
    assert queue.ahead_of("c") == 0
    assert queue.release("a") == ["c"]


def test_no_limit_grants_everything_at_once() -> None:
    queue = SlotQueue(0)
    assert [queue.request(str(i), key(i)) for i in range(5)] == [[str(i)] for i in range(5)]


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        SlotQueue(-1)


# --- bandwidth ----------------------------------------------------------------------------------


def test_the_contracts_budget_example_8mi() -> None:
    assert max_min_shares(8 * MiB, {"a": 0}) == {"a": 8 * MiB}
    assert max_min_shares(8 * MiB, {"a": 0, "b": 0}) == {"a": 4 * MiB, "b": 4 * MiB}
    # A job limited by its own spec to 1Mi keeps it; the others split the rest.
    three = max_min_shares(8 * MiB, {"a": 0, "b": 0, "c": 1 * MiB})
    assert three == {"a": 7 * MiB // 2, "b": 7 * MiB // 2, "c": 1 * MiB}


def test_an_own_limit_above_the_equal_split_gets_the_split() -> None:
    assert max_min_shares(8 * MiB, {"a": 100 * MiB, "b": 0}) == {"a": 4 * MiB, "b": 4 * MiB}


def test_water_filling_goes_on_after_a_capped_job() -> None:
    # 10 over four: d (1) keeps 1; 9 over three = 3; c (2) keeps 2; 7 over two = 3.5 each.
    shares = max_min_shares(10 * MiB, {"a": 0, "b": 5 * MiB, "c": 2 * MiB, "d": 1 * MiB})
    assert shares == {"a": 7 * MiB // 2, "b": 7 * MiB // 2, "c": 2 * MiB, "d": 1 * MiB}
    assert sum(shares.values()) == 10 * MiB


def test_the_whole_budget_is_handed_out_and_no_share_is_zero() -> None:
    shares = max_min_shares(10, {"a": 0, "b": 0, "c": 0})
    assert sorted(shares.values()) == [3, 3, 4] and sum(shares.values()) == 10
    # 0 would read as "unlimited" to QEMU: a starved share is 1 byte/s, never 0.
    assert set(max_min_shares(2, {"a": 0, "b": 0, "c": 0}).values()) == {1}


def test_no_budget_means_every_job_runs_at_its_own_limit() -> None:
    assert max_min_shares(0, {"a": 0, "b": 3 * MiB}) == {"a": 0, "b": 3 * MiB}


# --- the asyncio side ---------------------------------------------------------------------------


async def test_grants_arrive_as_futures_and_a_release_passes_the_slot_on() -> None:
    scheduler = NodeScheduler(limit=1, budget=0)
    scheduler.open()  # the agent's start does this after reading the node's list
    first = scheduler.request("a", key(1))
    second = scheduler.request("b", key(2))
    assert first.done() and not second.done()
    assert scheduler.request("b", key(2)) is second, "asking again keeps the same place"
    scheduler.release("a")
    await asyncio.wait_for(second, 1)
    scheduler.release("b")
    assert scheduler.holders == 0


async def test_objects_from_a_restart_list_hold_their_slots_before_their_runners_ask() -> None:
    scheduler = NodeScheduler(limit=2, budget=0)
    assert not scheduler.is_open and not scheduler.opened.is_set()
    scheduler.expect([("w1", key(1)), ("w2", key(2))], running=["r1"])
    late = scheduler.request("new", key(0))  # seen first by the watch, but created earlier
    assert not late.done()
    scheduler.open()
    assert scheduler.opened.is_set() and late.done()
    assert scheduler.request("w1", key(1)).done() is False
    scheduler.release("r1")
    assert scheduler.request("w1", key(1)).done()


async def test_shares_move_when_jobs_start_pause_and_end() -> None:
    scheduler = NodeScheduler(limit=0, budget=8 * MiB)
    told: list[str] = []
    assert scheduler.copying("a", 0, lambda: told.append("a")) == 8 * MiB
    assert scheduler.copying("b", 0, lambda: told.append("b")) == 4 * MiB
    assert told == ["a"], "a's share fell from 8 to 4 MiB/s: a is told, b knows"
    assert scheduler.copying("c", 1 * MiB, lambda: told.append("c")) == 1 * MiB
    assert (scheduler.share("a"), scheduler.share("b")) == (7 * MiB // 2, 7 * MiB // 2)
    assert told == ["a", "a", "b"]
    scheduler.stopped_copying("b")  # paused
    assert (scheduler.share("a"), scheduler.share("c")) == (7 * MiB, 1 * MiB)
    scheduler.release("c")  # ended
    assert scheduler.share("a") == 8 * MiB
    assert told == ["a", "a", "b", "a", "a"]
    # A spec edit that changes nothing tells nobody.
    scheduler.copying("a", 0, lambda: told.append("a"))
    assert told == ["a", "a", "b", "a", "a"]
