"""In-memory stand-ins for the agent's two edges, to drive the real Agent, runners and reporters
in-process: a block-job driver whose jobs move only when the test says so, and the agent's
Kubernetes API calls recorded instead of sent. The protocol sequences (`blockpull.pull`) run
unchanged on top of them, so a test sees the same order of calls a real QEMU would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from blockpull.agent.clock import WallClock
from blockpull.agent.kube import Gone, ObjectRef, QueuedWrite
from blockpull.driver import CANCELLED_ERROR, ChainImage, Progress, StartedJob, StreamRequest
from blockpull.errors import DiskBusy, JobNotFound, VMNotFound

MiB = 1 << 20
#: Controlled time starts here (the objects' creationTimestamp in `body`).
EPOCH = datetime.datetime(2026, 12, 4, 10, 0, tzinfo=datetime.UTC)


class FakeWatch:
    def __init__(self, driver: FakeDriver) -> None:
        self._driver = driver

    async def changed(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._driver.changed.wait()
        except TimeoutError:
            return False
        self._driver.changed.clear()
        return True


@dataclass
class FakeDriver:
    """One VM with one disk `vda` (a three-image chain) and the jobs started on it."""

    length: int = 64 * MiB
    jobs: dict[str, Progress] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    pulled_disk: bool = False
    can_pause: bool = True
    describe: str = "fake VM"
    closed: bool = False
    chain_images: tuple[ChainImage, ...] = (
        ChainImage("top", "/img/top.qcow2", "qcow2", "mid.qcow2", 64 * MiB),
        ChainImage("mid", "/img/mid.qcow2", "qcow2", "base.qcow2", 64 * MiB),
        ChainImage("base", "/img/base.qcow2", "qcow2", None, 64 * MiB),
    )

    # --- what the test does to the "hypervisor" -----------------------------------------------

    def advance(self, job_id: str, offset: int) -> None:
        self._set(job_id, offset=offset)

    def finish_copy(self, job_id: str) -> None:
        """The copy is done: the job waits at `pending`, as QEMU holds it (auto-finalize off)."""
        self._set(job_id, status="pending", offset=self.length)

    def fail(self, job_id: str, error: str) -> None:
        self._set(job_id, status="concluded", error=error)

    def _set(self, job_id: str, **changes: Any) -> None:
        self.jobs[job_id] = replace(self.jobs[job_id], **changes)
        self.changed.set()

    # --- BlockJobDriver ---------------------------------------------------------------------

    async def start(self, request: StreamRequest) -> StartedJob:
        self.calls.append(("start", request.job_id))
        if any(not job.concluded for job in self.jobs.values()):
            raise DiskBusy(f"disk {request.disk!r} is busy")
        self.jobs[request.job_id] = Progress(
            request.job_id, "running", 0, self.length, request.bandwidth, False, "ok", None, "stream"
        )
        return StartedJob(
            request.job_id, "top", None, self.chain_images, tuple(i.filename for i in self.chain_images[1:])
        )

    async def find_job(self, job_id: str) -> Progress | None:
        return self.jobs.get(job_id)

    async def list_jobs(self) -> list[Progress]:
        return list(self.jobs.values())

    async def blocking_jobs(self, disk: str) -> list[Progress]:
        return list(self.jobs.values())

    def collect_command(self, job: Progress) -> str:
        return f"collect {job.job_id}"

    async def chain(self, disk: str) -> tuple[ChainImage, ...]:
        return self.chain_images[:1] if self.pulled_disk else self.chain_images

    async def set_speed(self, job_id: str, bytes_per_second: int) -> None:
        self.calls.append(("set_speed", str(bytes_per_second)))
        self._set(job_id, speed=bytes_per_second)

    async def pause(self, job_id: str) -> None:
        self.calls.append(("pause", job_id))
        self._set(job_id, status="paused", paused=True)

    async def resume(self, job_id: str) -> None:
        self.calls.append(("resume", job_id))
        self._set(job_id, status="running", paused=False)

    async def cancel(self, job_id: str) -> None:
        self.calls.append(("cancel", job_id))
        if job_id in self.jobs and not self.jobs[job_id].concluded:
            self._set(job_id, status="concluded", error=CANCELLED_ERROR)

    async def finalize(self, job_id: str, device: str | None) -> None:
        self.calls.append(("finalize", job_id))
        self.pulled_disk = True
        self._set(job_id, status="concluded")

    async def make_durable(self, device: str | None) -> None:
        self.calls.append(("flush", str(device)))

    async def dismiss(self, job_id: str) -> None:
        self.calls.append(("dismiss", job_id))
        if self.jobs.pop(job_id, None) is None:
            raise JobNotFound(job_id)

    async def pulled(self, disk: str, base: str | None) -> bool:
        return self.pulled_disk

    @contextlib.asynccontextmanager
    async def _watch(self) -> AsyncIterator[FakeWatch]:
        yield FakeWatch(self)

    def watch(self, job_id: str) -> contextlib.AbstractAsyncContextManager[FakeWatch]:
        return self._watch()

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeVMs:
    """`VMs` with one fake VM per name; an unknown VM is not there yet (VMNotFound)."""

    drivers: dict[str, FakeDriver] = field(default_factory=dict)

    def locate(self, namespace: str, vm: str) -> str:
        return f"{namespace}/{vm}"

    async def driver_for(self, namespace: str, vm: str) -> FakeDriver:
        if vm not in self.drivers:
            raise VMNotFound(f"no VM {vm}")
        return self.drivers[vm]

    async def close_all(self) -> None:
        return None


@dataclass
class FakeKube:
    """The agent's API calls, recorded: status patches merged into `statuses`, Events listed."""

    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[str, str, str, str]] = field(default_factory=list)
    uids: dict[str, set[str]] = field(default_factory=dict)
    #: What a list of the node's objects returns (the agent's start reads it).
    objects: list[dict[str, Any]] = field(default_factory=list)
    writes: dict[str, int] = field(default_factory=lambda: {"status": 0, "event": 0, "delete": 0})
    writes_of: dict[str, int] = field(default_factory=dict)  # status writes per object name
    #: Objects deleted behind the agent's back: their status writes answer 404 (Gone).
    gone: set[str] = field(default_factory=set)

    async def patch_status(
        self,
        ref: ObjectRef,
        status: Mapping[str, Any],
        *,
        urgent: bool = True,
        queued: QueuedWrite | None = None,
    ) -> bool:
        if queued is not None and not queued.begin():
            return False
        if ref.name in self.gone:
            raise Gone(f"404: {ref.name} not found")
        self.writes["status"] += 1
        self.writes_of[ref.name] = self.writes_of.get(ref.name, 0) + 1
        merged = self.statuses.setdefault(ref.name, {})
        for key, value in status.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return True

    async def post_event(self, ref: ObjectRef, kind: str, reason: str, message: str) -> None:
        self.writes["event"] += 1
        self.events.append((ref.name, kind, reason, message))

    async def delete(self, ref: ObjectRef) -> None:
        self.writes["delete"] += 1

    async def object_uids(self, namespace: str) -> set[str]:
        return self.uids.get(namespace, set())

    async def node_objects(self, namespace: str | None) -> list[dict[str, Any]]:
        return list(self.objects)

    def reasons(self, name: str) -> list[str]:
        return [reason for obj, _, reason, _ in self.events if obj == name]


def body(
    name: str, uid: str, generation: int = 1, status: Mapping[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "vms",
            "uid": uid,
            "generation": generation,
            "creationTimestamp": "2026-12-04T10:00:00Z",
        },
        "spec": {"nodeName": "node-a", "vm": "web-1", "disk": "vda", **spec},
        "status": dict(status or {}),
    }


def loop_clock(epoch: datetime.datetime = EPOCH) -> WallClock:
    """A wall clock that follows the event loop's time from `epoch`: with looptime, the
    agent's deadlines, TTLs and timestamps run on the same controlled time as its sleeps."""
    loop = asyncio.get_running_loop()
    return lambda: epoch + datetime.timedelta(seconds=loop.time())


async def eventually(probe: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Until `probe()` is true, looking every 10 ms (every 1/2000 of a longer timeout: on
    controlled time an hour's wait is then a few thousand looks, not hundreds of thousands)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    step = max(0.01, timeout / 2000)
    while True:
        value = probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(step)
