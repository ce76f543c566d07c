"""A cancelled waiter is cancelled: never swallowed by a wait that completes at the same moment.

Python 3.11's `asyncio.wait_for` returns the result when the awaited thing completes while the
task is being cancelled, and the cancellation is lost: a runner told to stop at agent shutdown
then followed its job on forever (seen as a hang one run in five). The product waits with
`asyncio.timeout`, which keeps the cancellation.
"""

from __future__ import annotations

import asyncio

import pytest

from blockpull.qmp import Event, Subscription


async def test_a_subscription_waiter_cancelled_as_an_event_arrives_is_cancelled() -> None:
    for _ in range(50):
        subscription = Subscription(None, 8)
        waiter = asyncio.create_task(subscription.get(timeout=10))
        await asyncio.sleep(0)  # the waiter now waits for the wakeup
        subscription._push(Event("JOB_STATUS_CHANGE", {"id": "j"}, 0.0))
        waiter.cancel()  # in the same loop iteration as the event
        with pytest.raises(asyncio.CancelledError):
            await waiter
