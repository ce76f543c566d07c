"""A new object's first status (`Starting`) goes out on a lane of its own while the agent
talks to QEMU. In a burst of new objects that lane queues; a write that supersedes the first
one before it left the agent must not wait behind the queue, and the first one is then never
sent. A first write that has begun is waited for, so writes reach the API in order.

The real `KubeAPI` (its thread pools) and `ObjectReporter`; only the official client's
CustomObjectsApi is replaced by one that records patches and can hold them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kubernetes.client
import pytest

from blockpull.agent import status as st
from blockpull.agent import views
from blockpull.agent.kube import KubeAPI, ObjectRef, QueuedWrite
from blockpull.agent.reporter import ObjectReporter

FIRST_STATUS_THREADS = 1  # KubeAPI's first-status lane


class HeldCustomObjects:
    """Records status patches in arrival order; a patch of an object named in `hold` blocks
    its worker thread until `release`."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, str]] = []  # (object name, phase)
        self.hold: set[str] = set()
        self._released = threading.Event()
        self._lock = threading.Lock()

    def patch_namespaced_custom_object_status(  # noqa: PLR0917 (the official client's signature)
        self,
        group: str,
        version: str,
        namespace: str,
        plural: str,
        name: str,
        body: Mapping[str, Any],
        **_: Any,
    ) -> dict[str, Any]:
        if name in self.hold:
            assert self._released.wait(30), "held patch never released"
        with self._lock:
            self.patches.append((name, str(body["status"].get("phase"))))
        return dict(body)

    def release(self) -> None:
        self._released.set()

    def of(self, name: str) -> list[str]:
        with self._lock:
            return [phase for obj, phase in self.patches if obj == name]


@pytest.fixture
async def api() -> AsyncIterator[tuple[KubeAPI, HeldCustomObjects]]:
    kube = KubeAPI(kubernetes.client.ApiClient(), component="test", node_name="node-a")
    custom = HeldCustomObjects()
    kube._custom = custom  # type: ignore[assignment]
    yield kube, custom
    custom.release()


def reporter(kube: KubeAPI, name: str) -> ObjectReporter:
    ref = ObjectRef("ns", name, f"uid-{name}")
    return ObjectReporter(kube, ref, node_name="node-a", interval=2.0, status=None, generation=lambda: 1)


def starting() -> st.StatusView:
    return views.pending("Starting", "the agent is connecting to the VM's QEMU")


def running() -> st.StatusView:
    return st.StatusView(phase=st.RUNNING, reason="Streaming", message="streamed 0 B of 64.0 MiB")


async def test_a_first_write_still_queued_is_superseded_and_never_sent(
    api: tuple[KubeAPI, HeldCustomObjects],
) -> None:
    kube, custom = api
    # A burst: the first-status lane is busy with other objects' first writes.
    blockers = [f"other-{i}" for i in range(FIRST_STATUS_THREADS)]
    custom.hold.update(blockers)
    others = [reporter(kube, name) for name in blockers]
    for other in others:
        other.transition_soon(starting())
    new = reporter(kube, "new")
    new.transition_soon(starting())  # queued behind them
    await asyncio.sleep(0.1)

    async with asyncio.timeout(5):  # does not wait for the first-status lane
        await new.transition(running())
    assert custom.of("new") == ["Running"]
    assert new.status["phase"] == "Running"
    assert kube.writes["status"] == 1, "the withdrawn write is not counted as sent"

    custom.release()
    for other in others:
        async with asyncio.timeout(5):
            await other.transition(running())
    await asyncio.sleep(0.1)  # the lane reaches the withdrawn write, which sends nothing
    assert custom.of("new") == ["Running"], "the superseded first write was sent after all"
    assert new.status["phase"] == "Running", "the withdrawn write changed the reporter's status"
    for name in blockers:
        assert custom.of(name) == ["Pending", "Running"]


async def test_a_first_write_that_has_begun_is_waited_for(api: tuple[KubeAPI, HeldCustomObjects]) -> None:
    kube, custom = api
    custom.hold.add("new")
    new = reporter(kube, "new")
    new.transition_soon(starting())
    await asyncio.sleep(0.1)  # a worker has begun it (and is held in the API call)

    running_write = asyncio.ensure_future(new.transition(running()))
    await asyncio.sleep(0.2)
    assert not running_write.done(), "a later write overtook a write already on its way"
    custom.release()
    async with asyncio.timeout(5):
        await running_write
    assert custom.of("new") == ["Pending", "Running"]
    assert new.status["phase"] == "Running"


def test_a_queued_write_is_either_withdrawn_or_begun_never_both() -> None:
    withdrawn = QueuedWrite()
    assert withdrawn.withdraw() and withdrawn.withdraw()
    assert not withdrawn.begin()
    begun = QueuedWrite()
    assert begun.begin() and begun.begin()  # a retry of the same write
    assert not begun.withdraw()
