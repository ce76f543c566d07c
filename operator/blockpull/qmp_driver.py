"""The QMP driver: one VM's QEMU reached through a QMP monitor of BlockPull's own.

Owns: putting `blockpull.stream` and `blockpull.chain` (QEMU's commands, with BlockPull's
rules) behind the `BlockJobDriver` interface, and turning QEMU's job events into the
"something happened to this job" notifications the protocol sequences wait on.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from blockpull import stream
from blockpull.chain import job_device, jobs_holding
from blockpull.chain import read_chain as read_disk_chain
from blockpull.driver import ChainImage, Progress, StartedJob, StreamRequest
from blockpull.errors import InspectionUnsafe, JobNotFound
from blockpull.qmp import QMPConnection, Subscription


class QMPJobWatch:
    """QEMU's job events for one job (JOB_STATUS_CHANGE and BLOCK_JOB_*)."""

    def __init__(self, subscription: Subscription, job_id: str) -> None:
        self._subscription = subscription
        self._job_id = job_id

    async def changed(self, timeout: float) -> bool:
        if self._subscription.overflowed:  # events were dropped: re-read, as after an event
            self._subscription.overflowed = False
            return True
        try:
            while True:
                event = await self._subscription.get(timeout=timeout)
                if stream.concerns(event.data, self._job_id):
                    return True
        except TimeoutError:
            return False


class QMPDriver:
    """`BlockJobDriver` over one shared `QMPConnection`."""

    can_pause = True

    def __init__(self, conn: QMPConnection) -> None:
        self.conn = conn
        self.describe = f"QMP socket {conn.socket_path}"

    async def start(self, request: StreamRequest) -> StartedJob:
        return await stream.start_stream(self.conn, request)

    async def find_job(self, job_id: str) -> Progress | None:
        return await stream.find_job(self.conn, job_id)

    async def list_jobs(self) -> list[Progress]:
        return await stream.list_jobs(self.conn)

    async def blocking_jobs(self, disk: str) -> list[Progress]:
        try:
            ids = set(await jobs_holding(self.conn, disk))
        except InspectionUnsafe:
            # The graph cannot be read safely now (a job is concluded): name every job QEMU has,
            # which is what a user must look at anyway.
            return await self.list_jobs()
        return [job for job in await self.list_jobs() if job.job_id in ids]

    def collect_command(self, job: Progress) -> str:
        # `wait` finalizes durably, reports and dismisses a stream job; `abort` any other kind.
        verb = "wait" if job.job_type in ("stream", "") else "abort"
        return f"blockpull {verb} {self.conn.socket_path} {job.job_id}"

    async def chain(self, disk: str) -> tuple[ChainImage, ...]:
        return stream.chain_images(await read_disk_chain(self.conn, disk))

    async def set_speed(self, job_id: str, bytes_per_second: int) -> None:
        await stream.set_bandwidth(self.conn, job_id, bytes_per_second)

    async def pause(self, job_id: str) -> None:
        await stream.pause(self.conn, job_id)

    async def resume(self, job_id: str) -> None:
        await stream.resume(self.conn, job_id)

    async def cancel(self, job_id: str) -> None:
        await stream.cancel(self.conn, job_id)

    async def finalize(self, job_id: str, device: str | None) -> None:
        node = device or await job_device(self.conn, job_id)
        if node is None:
            raise JobNotFound(f"QEMU has no stream job {job_id!r} holding a disk")
        await stream.finalize(self.conn, job_id, node)

    async def make_durable(self, device: str | None) -> None:
        if device is not None:
            await stream.flush_disk(self.conn, device)

    async def dismiss(self, job_id: str) -> None:
        await stream.dismiss(self.conn, job_id)

    async def pulled(self, disk: str, base: str | None) -> bool:
        return await stream.pulled(self.conn, disk, base)

    def watch(self, job_id: str) -> AbstractAsyncContextManager[QMPJobWatch]:
        return self._watch(job_id)

    @contextlib.asynccontextmanager
    async def _watch(self, job_id: str) -> AsyncIterator[QMPJobWatch]:
        subscription = self.conn.subscribe(stream.JOB_EVENTS)
        try:
            yield QMPJobWatch(subscription, job_id)
        finally:
            self.conn.unsubscribe(subscription)

    @property
    def closed(self) -> bool:
        return self.conn.closed

    async def close(self) -> None:
        await self.conn.close()
