"""The libvirt driver: one libvirt domain's disks, through libvirt's own block-job API.

Owns: putting `virDomainBlockPull`/`virDomainBlockRebase`, `blockJobInfo`,
`blockJobSetSpeed` and `blockJobAbort` behind the `BlockJobDriver` interface, with libvirt's
naming rules (`blockpull.libvirt.xmlchain`) and its error codes mapped onto BlockPull's errors.
Never a QEMU monitor command: the domain stays untainted and libvirt's XML stays true.

How libvirt's job model maps onto the driver's five states:
- A job shows as `running` while `blockJobInfo` reports it (`cur`/`end` are the offset and
  length). libvirt has no pause, so never `paused`; and it finalizes and dismisses jobs
  itself, so never `pending`.
- The BLOCK_JOB_2 event (COMPLETED, FAILED, CANCELED) is the only record of how a job ended;
  the connection keeps it as a `concluded` job until `dismiss`. A FAILED job has no error
  text in libvirt: its `error` says so.
- A job that ended while nobody listened (the agent or libvirtd was away) is simply gone:
  `find_job` returns None and `pulled` judges it from libvirt's XML.
- Job ids are `<domain>/<target>` (a disk has at most one job). The id a caller asked for at
  start is also accepted; it is recorded in the domain's live metadata (libvirt's own
  per-domain store, under BlockPull's namespace), so it still finds the job after this
  process or libvirtd restarted.

The driver puts these rules together; each part is a module of its own: reading the domain
(`domainview`: disks, a disk's running job, its size), the calls that start and steer a job and
what libvirt's refusals mean (`commands`), the ids a job answers to (`jobnames`), and waiting
for the events that tell how a job ended (`outcomes`). What the events say is kept by the
shared connection (`connection.DomainJobs`), so that every driver of a domain sees it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from contextlib import AbstractAsyncContextManager

from blockpull.driver import ChainImage, Progress, StartedJob, StreamRequest
from blockpull.errors import CommandFailed, DiskBusy, Unsupported
from blockpull.libvirt import commands, xmlchain
from blockpull.libvirt.connection import LibvirtConnection, job_id_of
from blockpull.libvirt.domainview import DomainView, chain_with_size
from blockpull.libvirt.jobnames import JobNames
from blockpull.libvirt.outcomes import JobEnds, LibvirtJobWatch


class LibvirtDriver:
    """`BlockJobDriver` for libvirt domain `domain` over a shared `LibvirtConnection`."""

    can_pause = False

    def __init__(self, conn: LibvirtConnection, domain: str) -> None:
        self.conn = conn
        self.domain = domain
        self._jobs = conn.jobs(domain)
        self._view = DomainView(conn, domain, self._jobs)
        self.describe = self._view.describe
        self._names = JobNames(conn, domain, self._jobs, self.describe)
        self._ends = JobEnds(conn, self._jobs)
        self._closed = False

    async def start(self, request: StreamRequest) -> StartedJob:
        if request.on_error != "report":
            raise Unsupported(
                f"libvirt cannot set a block pull's on-error policy ({request.on_error!r}); its pulls "
                "always stop and report on an error (onError: report)"
            )
        disk = self._view.disk(request.disk)
        target = disk.target
        base = xmlchain.resolve_base(disk, request.base) if request.base else None
        job_id = job_id_of(self.domain, target)
        running = self._view.running_job(target)
        if running is not None:
            raise DiskBusy(f"disk {target!r} of {self.describe} is in another block job ({running.job_type})")
        if target in self._jobs.last and target not in self._jobs.concluded:
            # A job we saw has just ended: let its event arrive now, not after ours started.
            await self._ends.conclusion(target)
        self._jobs.concluded.pop(target, None)
        # The size before the job starts: asking during one risks QEMU's life (`capacity_now`).
        chain = chain_with_size(disk, self._view.capacity_now(target))
        commands.begin(self._view, target, base, request.bandwidth)
        self._names.remember(request.job_id, target)
        # Until the first reading (the job may end before it): a job that libvirt no longer
        # lists waits for its event (`find_job`), and its length is the disk's size.
        self._jobs.last[target] = Progress(
            job_id=job_id,
            status="running",
            offset=0,
            length=chain[0].virtual_size if chain else 0,
            speed=request.bandwidth,
            paused=False,
            io_status="ok",
            error=None,
            job_type="stream",
        )
        self._names.record(request.job_id, target)
        with contextlib.suppress(CommandFailed):
            self._view.running_job(target)
        keep = disk.images.index(base) if base is not None else len(disk.images)
        return StartedJob(
            job_id=job_id,
            device=target,
            base_node=base.node if base is not None else None,
            chain=chain,
            released_images=tuple(image.filename for image in disk.images[1:keep]),
        )

    async def find_job(self, job_id: str) -> Progress | None:
        target = self._names.target_of(job_id)
        if target is None:
            return None
        concluded = self._jobs.concluded.get(target)
        if concluded is None:
            running = self._view.running_job(target, job_id)
            if running is not None:
                return running
            if target in self._jobs.last:
                # We saw it running and libvirt has forgotten it: its event is on the way
                # (libvirt drops the job a few ms before the event reaches us).
                concluded = await self._ends.conclusion(target)
        return dataclasses.replace(concluded, job_id=job_id) if concluded is not None else None

    async def list_jobs(self) -> list[Progress]:
        found: list[Progress] = []
        for disk in self._view.disks():
            concluded = self._jobs.concluded.get(disk.target)
            job = concluded or self._view.running_job(disk.target)
            if job is not None:
                found.append(job)
        return found

    async def blocking_jobs(self, disk: str) -> list[Progress]:
        target = self._view.disk(disk).target
        job = self._view.running_job(target)
        return [job] if job is not None else []

    def collect_command(self, job: Progress) -> str:
        # libvirt finalizes and dismisses its jobs itself: one that holds a disk is running.
        target = job.job_id.rsplit("/", 1)[-1]
        return f"virsh -c {self.conn.uri} blockjob {self.domain} {target} --abort"

    async def chain(self, disk: str) -> tuple[ChainImage, ...]:
        """The chain from the live XML; the active image's virtual size only while a job runs
        on the disk (its `end`): asking libvirt otherwise risks QEMU's life (`capacity_now`)."""
        found = self._view.disk(disk)
        job = self._view.running_job(found.target)
        return chain_with_size(found, job.length if job is not None else 0)

    async def set_speed(self, job_id: str, bytes_per_second: int) -> None:
        commands.set_speed(self._view, self._names.require(job_id), job_id, bytes_per_second)

    async def pause(self, job_id: str) -> None:
        raise Unsupported(
            "libvirt has no block-job pause: the job keeps running (BlockPull never pauses it behind "
            "libvirt's back)"
        )

    async def resume(self, job_id: str) -> None:
        """Nothing to do: a libvirt job is never paused."""
        self._names.require(job_id)

    async def cancel(self, job_id: str) -> None:
        target = self._names.require(job_id)
        if target in self._jobs.concluded:
            return  # it has ended already; its outcome stands
        try:
            # Synchronous: returns once QEMU has ended the job; its event follows at once.
            self._view.call(lambda d: d.blockJobAbort(target, 0))
        except CommandFailed as exc:
            if target in self._jobs.concluded:
                return  # it ended while we asked
            raise commands.no_job(exc, self.describe, job_id) from exc
        await self._ends.conclusion(target)

    async def finalize(self, job_id: str, device: str | None) -> None:
        """Nothing to do: libvirt finalizes its jobs itself (they never wait at `pending`)."""

    async def make_durable(self, device: str | None) -> None:
        """Nothing BlockPull can do: libvirt has no API that flushes a disk (see docs/libvirt.md)."""

    async def dismiss(self, job_id: str) -> None:
        target = self._names.target_of(job_id)
        if target is None:
            return
        self._jobs.concluded.pop(target, None)
        self._names.forget(target)

    async def pulled(self, disk: str, base: str | None) -> bool:
        return xmlchain.pulled(self._view.disk(disk), base)

    def watch(self, job_id: str) -> AbstractAsyncContextManager[LibvirtJobWatch]:
        return self._ends.watch(self)

    @property
    def closed(self) -> bool:
        return self._closed or self.conn.closed

    async def close(self) -> None:
        """Done with this domain; the shared connection stays open for others."""
        self._closed = True
        self._jobs.wake()
