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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar
from xml.sax.saxutils import quoteattr

import libvirt
from blockpull.driver import ChainImage, Progress, StartedJob, StreamRequest
from blockpull.errors import (
    BaseNotInChain,
    CommandFailed,
    Disconnected,
    DiskBusy,
    DiskNotFound,
    HypervisorUnavailable,
    JobNotFound,
    Unsupported,
    VMNotFound,
)
from blockpull.libvirt import xmlchain
from blockpull.libvirt.connection import (
    ERR_AGAIN,
    ERR_INVALID_ARG,
    ERR_OPERATION_INVALID,
    JOB_TYPES,
    DomainJobs,
    LibvirtConnection,
    job_id_of,
)

#: BlockPull's namespace in a domain's metadata: the job ids it started, by disk target.
METADATA_NS = "https://blockpull.dev/libvirt/jobs/v1"
METADATA_KEY = "blockpull"

T = TypeVar("T")

#: How long a job libvirt no longer lists may take to announce its end (measured: ~7 ms).
EVENT_GRACE = 2.0


class LibvirtJobWatch:
    """Wakes on the domain's block-job and lifecycle events and on reconnects."""

    def __init__(self, driver: LibvirtDriver, jobs: DomainJobs, event: asyncio.Event) -> None:
        self._driver = driver
        self._jobs = jobs
        self._event = event

    def _check(self) -> None:
        if self._driver.closed:
            raise Disconnected(f"the libvirt driver for {self._driver.describe} is closed")
        if self._jobs.gone:
            raise Disconnected(f"libvirt domain {self._jobs.name!r} stopped")

    async def changed(self, timeout: float) -> bool:
        self._check()
        if not self._event.is_set():
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                return False
        self._event.clear()
        self._check()
        return True


class LibvirtDriver:
    """`BlockJobDriver` for libvirt domain `domain` over a shared `LibvirtConnection`."""

    can_pause = False

    def __init__(self, conn: LibvirtConnection, domain: str) -> None:
        self.conn = conn
        self.domain = domain
        self.describe = f"libvirt domain {domain} at {conn.uri}"
        self._jobs = conn.jobs(domain)
        self._closed = False

    # --- reading -------------------------------------------------------------------------

    def _call_domain(self, fn: Callable[[libvirt.virDomain], T]) -> T:
        try:
            return self.conn.call(self.domain, fn)
        except VMNotFound as exc:
            if self._jobs.gone and (self._jobs.last or self._jobs.aliases):
                # The domain we had a job on stopped: QEMU went away mid-job.
                raise Disconnected(f"libvirt domain {self.domain!r} stopped during the pull") from exc
            raise

    def _disks(self) -> list[xmlchain.XmlDisk]:
        return xmlchain.parse_disks(self._call_domain(lambda d: d.XMLDesc(0)))

    def _disk(self, name: str) -> xmlchain.XmlDisk:
        return xmlchain.resolve_disk(self._disks(), name)

    def _info(self, target: str, job_id: str | None = None) -> Progress | None:
        info = self._call_domain(
            lambda d: d.blockJobInfo(target, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
        )
        if not info:
            return None
        progress = Progress(
            job_id=job_id or job_id_of(self.domain, target),
            status="running",
            offset=int(info.get("cur", 0)),
            length=int(info.get("end", 0)),
            speed=int(info.get("bandwidth", 0)),
            paused=False,
            io_status="ok",
            error=None,
            job_type=JOB_TYPES.get(int(info.get("type", 0)), str(info.get("type", ""))),
        )
        self._jobs.last[target] = progress
        return progress

    def _recorded_ids(self) -> dict[str, str]:
        """Job ids recorded in the domain's live metadata, by id: target."""
        try:
            text = self.conn.call(
                self.domain,
                lambda d: d.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE
                ),
            )
        except CommandFailed:
            return {}  # no metadata of ours (libvirt: "metadata not found")
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            return {}
        return {job.get("id", ""): job.get("disk", "") for job in root.iter("job") if job.get("id")}

    def _record_id(self, job_id: str | None, target: str) -> None:
        """Record `job_id` as the name of `target`'s job (None: forget `target`'s job)."""
        ids = {i: t for i, t in self._recorded_ids().items() if t != target}
        if job_id is not None:
            ids[job_id] = target
        body = "".join(f"<job id={quoteattr(i)} disk={quoteattr(t)}/>" for i, t in ids.items())
        # Best effort: the job runs either way; without it only `<domain>/<target>` finds it
        # after a restart.
        with contextlib.suppress(CommandFailed):
            self.conn.call(
                self.domain,
                lambda d: d.setMetadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    f"<jobs>{body}</jobs>",
                    METADATA_KEY,
                    METADATA_NS,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE,
                ),
            )

    def _target_of(self, job_id: str) -> str | None:
        target = self._jobs.aliases.get(job_id)
        if target is not None:
            return target
        prefix = f"{self.domain}/"
        if job_id.startswith(prefix) and job_id[len(prefix) :]:
            return job_id[len(prefix) :]
        target = self._recorded_ids().get(job_id)
        if target:
            self._jobs.aliases[job_id] = target
        return target or None

    def _require_target(self, job_id: str) -> str:
        target = self._target_of(job_id)
        if target is None:
            raise JobNotFound(f"no block job {job_id!r} on {self.describe}")
        return target

    def _capacity_now(self, target: str) -> int:
        """The disk's virtual size through `virDomainGetBlockInfo`. ONLY while the disk has no
        block job: libvirt answers it with `query-named-block-nodes`, which crashes QEMU 7.2
        (SIGSEGV) while a stream job is concluded and not yet dismissed - a window libvirt
        leaves open after every job (measured: a call right after a fast pull killed the
        domain, "shutting down, reason=crashed")."""
        with contextlib.suppress(CommandFailed):
            return int(self._call_domain(lambda d: d.blockInfo(target))[0])
        return 0

    def _chain(self, disk: xmlchain.XmlDisk, virtual_size: int) -> tuple[ChainImage, ...]:
        images = list(disk.images)
        if images:
            images[0] = dataclasses.replace(images[0], virtual_size=virtual_size)
        return tuple(images)

    # --- the interface -------------------------------------------------------------------

    async def start(self, request: StreamRequest) -> StartedJob:
        if request.on_error != "report":
            raise Unsupported(
                f"libvirt cannot set a block pull's on-error policy ({request.on_error!r}); its pulls "
                "always stop and report on an error (onError: report)"
            )
        disk = self._disk(request.disk)
        target = disk.target
        base = xmlchain.resolve_base(disk, request.base) if request.base else None
        job_id = job_id_of(self.domain, target)
        running = self._info(target)
        if running is not None:
            raise DiskBusy(f"disk {target!r} of {self.describe} is in another block job ({running.job_type})")
        if target in self._jobs.last and target not in self._jobs.concluded:
            # A job we saw has just ended: let its event arrive now, not after ours started.
            await self._await_conclusion(target)
        self._jobs.concluded.pop(target, None)
        chain = self._chain(disk, self._capacity_now(target))  # before the job: see _capacity_now
        self._begin(target, base, request.bandwidth)
        self._jobs.aliases[request.job_id] = target
        self._jobs.aliases[job_id] = target
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
        self._record_id(request.job_id, target)
        with contextlib.suppress(CommandFailed):
            self._info(target)
        keep = disk.images.index(base) if base is not None else len(disk.images)
        return StartedJob(
            job_id=job_id,
            device=target,
            base_node=base.node if base is not None else None,
            chain=chain,
            released_images=tuple(image.filename for image in disk.images[1:keep]),
        )

    def _begin(self, target: str, base: ChainImage | None, bandwidth: int) -> None:
        try:
            if base is None:
                self._call_domain(
                    lambda d: d.blockPull(target, bandwidth, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
                )
                return
            flags = libvirt.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES
            try:
                # Keep a relative backing name relative (QEMU writes an absolute one otherwise).
                self._call_domain(
                    lambda d: d.blockRebase(
                        target, base.node, bandwidth, flags | libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE
                    )
                )
            except CommandFailed as exc:
                if exc.error_class != str(ERR_OPERATION_INVALID) or "relative" not in exc.message:
                    raise
                # The chain down to the base is not relative: libvirt refuses RELATIVE then.
                self._call_domain(lambda d: d.blockRebase(target, base.node, bandwidth, flags))
        except CommandFailed as exc:
            raise self._start_error(exc, target, base) from exc

    def _start_error(self, exc: CommandFailed, target: str, base: ChainImage | None) -> Exception:
        if exc.error_class == str(ERR_AGAIN):
            return DiskBusy(f"disk {target!r} of {self.describe} is busy: {exc.message}")
        if exc.error_class == str(ERR_INVALID_ARG):
            if base is not None and ("image" in exc.message or "index" in exc.message):
                return BaseNotInChain(f"libvirt refused base {base.node} ({base.filename}): {exc.message}")
            if "disk" in exc.message:
                return DiskNotFound(f"libvirt refused disk {target!r}: {exc.message}")
        return exc

    async def find_job(self, job_id: str) -> Progress | None:
        target = self._target_of(job_id)
        if target is None:
            return None
        concluded = self._jobs.concluded.get(target)
        if concluded is None:
            running = self._info(target, job_id)
            if running is not None:
                return running
            if target in self._jobs.last:
                # We saw it running and libvirt has forgotten it: its event is on the way
                # (libvirt drops the job a few ms before the event reaches us).
                concluded = await self._await_conclusion(target)
        return dataclasses.replace(concluded, job_id=job_id) if concluded is not None else None

    async def _await_conclusion(self, target: str) -> Progress | None:
        """The event-made record of `target`'s job, waiting for it at most `EVENT_GRACE` s."""
        event = asyncio.Event()
        self._jobs.waiters.add(event)
        try:
            async with asyncio.timeout(EVENT_GRACE):
                while target not in self._jobs.concluded and self.conn.connected:
                    await event.wait()
                    event.clear()
        except TimeoutError:
            pass
        finally:
            self._jobs.waiters.discard(event)
        concluded = self._jobs.concluded.get(target)
        if concluded is None:
            self._jobs.last.pop(target, None)  # ended unseen: the chain tells (`pulled`)
        return concluded

    async def list_jobs(self) -> list[Progress]:
        found: list[Progress] = []
        for disk in self._disks():
            concluded = self._jobs.concluded.get(disk.target)
            job = concluded or self._info(disk.target)
            if job is not None:
                found.append(job)
        return found

    async def blocking_jobs(self, disk: str) -> list[Progress]:
        target = self._disk(disk).target
        job = self._info(target)
        return [job] if job is not None else []

    def collect_command(self, job: Progress) -> str:
        # libvirt finalizes and dismisses its jobs itself: one that holds a disk is running.
        target = job.job_id.rsplit("/", 1)[-1]
        return f"virsh -c {self.conn.uri} blockjob {self.domain} {target} --abort"

    async def chain(self, disk: str) -> tuple[ChainImage, ...]:
        """The chain from the live XML; the active image's virtual size only while a job runs
        on the disk (its `end`): asking libvirt otherwise risks QEMU's life (`_capacity_now`)."""
        found = self._disk(disk)
        job = self._info(found.target)
        return self._chain(found, job.length if job is not None else 0)

    async def set_speed(self, job_id: str, bytes_per_second: int) -> None:
        target = self._require_target(job_id)
        try:
            self._call_domain(
                lambda d: d.blockJobSetSpeed(
                    target, bytes_per_second, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES
                )
            )
        except CommandFailed as exc:
            raise self._no_job(exc, job_id) from exc

    async def pause(self, job_id: str) -> None:
        raise Unsupported(
            "libvirt has no block-job pause: the job keeps running (BlockPull never pauses it behind "
            "libvirt's back)"
        )

    async def resume(self, job_id: str) -> None:
        """Nothing to do: a libvirt job is never paused."""
        self._require_target(job_id)

    async def cancel(self, job_id: str) -> None:
        target = self._require_target(job_id)
        if target in self._jobs.concluded:
            return  # it has ended already; its outcome stands
        try:
            # Synchronous: returns once QEMU has ended the job; its event follows at once.
            self._call_domain(lambda d: d.blockJobAbort(target, 0))
        except CommandFailed as exc:
            if target in self._jobs.concluded:
                return  # it ended while we asked
            raise self._no_job(exc, job_id) from exc
        await self._await_conclusion(target)

    def _no_job(self, exc: CommandFailed, job_id: str) -> Exception:
        if exc.error_class == str(ERR_INVALID_ARG) and "active block job" in exc.message:
            return JobNotFound(f"no block job {job_id!r} on {self.describe}: {exc.message}")
        return exc

    async def finalize(self, job_id: str, device: str | None) -> None:
        """Nothing to do: libvirt finalizes its jobs itself (they never wait at `pending`)."""

    async def make_durable(self, device: str | None) -> None:
        """Nothing BlockPull can do: libvirt has no API that flushes a disk (see docs/libvirt.md)."""

    async def dismiss(self, job_id: str) -> None:
        target = self._target_of(job_id)
        if target is None:
            return
        self._jobs.concluded.pop(target, None)
        for alias in [a for a, t in self._jobs.aliases.items() if t == target]:
            del self._jobs.aliases[alias]
        # The name goes too: a later job on this disk is not this one.
        with contextlib.suppress(VMNotFound, Disconnected, HypervisorUnavailable):
            self._record_id(None, target)

    async def pulled(self, disk: str, base: str | None) -> bool:
        return xmlchain.pulled(self._disk(disk), base)

    def watch(self, job_id: str) -> AbstractAsyncContextManager[LibvirtJobWatch]:
        return self._watch()

    @contextlib.asynccontextmanager
    async def _watch(self) -> AsyncIterator[LibvirtJobWatch]:
        event = asyncio.Event()
        self._jobs.waiters.add(event)
        try:
            yield LibvirtJobWatch(self, self._jobs, event)
        finally:
            self._jobs.waiters.discard(event)

    @property
    def closed(self) -> bool:
        return self._closed or self.conn.closed

    async def close(self) -> None:
        """Done with this domain; the shared connection stays open for others."""
        self._closed = True
        self._jobs.wake()
