"""One libvirt domain as libvirt shows it: its disks and chains, a disk's running job, its size.

Owns: the calls that read a domain for a driver, and one rule on top of the connection's error
translation: a domain that stops while we had a job on it is `Disconnected` (QEMU went away
mid-job, the pull's outcome is unknown), not `VMNotFound` (there is nothing to pull). Every
libvirt call a driver makes on its domain goes through `DomainView.call` for that rule.

It also keeps each disk's latest running reading in the domain's `DomainJobs.last`: libvirt's
end-of-job event carries no offset, so the concluded record the connection makes from the event
(`connection.concluded_progress`) takes the offset and length from that reading.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TypeVar

import libvirt
from blockpull.driver import ChainImage, Progress
from blockpull.errors import CommandFailed, Disconnected, VMNotFound
from blockpull.libvirt import xmlchain
from blockpull.libvirt.connection import JOB_TYPES, DomainJobs, LibvirtConnection, job_id_of

T = TypeVar("T")


class DomainView:
    """Reads libvirt domain `domain` over `conn`; `jobs` is the connection's record of its jobs."""

    def __init__(self, conn: LibvirtConnection, domain: str, jobs: DomainJobs) -> None:
        self.conn = conn
        self.domain = domain
        self.describe = f"libvirt domain {domain} at {conn.uri}"
        self._jobs = jobs

    def call(self, fn: Callable[[libvirt.virDomain], T]) -> T:
        """`fn(dom)` on the running domain, a stop under one of our jobs as `Disconnected`."""
        try:
            return self.conn.call(self.domain, fn)
        except VMNotFound as exc:
            if self._jobs.gone and (self._jobs.last or self._jobs.aliases):
                # The domain we had a job on stopped: QEMU went away mid-job.
                raise Disconnected(f"libvirt domain {self.domain!r} stopped during the pull") from exc
            raise

    def disks(self) -> list[xmlchain.XmlDisk]:
        return xmlchain.parse_disks(self.call(lambda d: d.XMLDesc(0)))

    def disk(self, name: str) -> xmlchain.XmlDisk:
        return xmlchain.resolve_disk(self.disks(), name)

    def running_job(self, target: str, job_id: str | None = None) -> Progress | None:
        """The job libvirt lists on `target` (`blockJobInfo`), named `job_id` or its stable name;
        None when libvirt lists none. Kept as the target's latest reading (see the module)."""
        info = self.call(lambda d: d.blockJobInfo(target, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES))
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

    def capacity_now(self, target: str) -> int:
        """The disk's virtual size through `virDomainGetBlockInfo`. ONLY while the disk has no
        block job: libvirt answers it with `query-named-block-nodes`, which crashes QEMU 7.2
        (SIGSEGV) while a stream job is concluded and not yet dismissed - a window libvirt
        leaves open after every job (measured: a call right after a fast pull killed the
        domain, "shutting down, reason=crashed")."""
        with contextlib.suppress(CommandFailed):
            return int(self.call(lambda d: d.blockInfo(target))[0])
        return 0


def chain_with_size(disk: xmlchain.XmlDisk, virtual_size: int) -> tuple[ChainImage, ...]:
    """`disk`'s chain, active image first, with the active image's virtual size (the XML has none)."""
    images = list(disk.images)
    if images:
        images[0] = dataclasses.replace(images[0], virtual_size=virtual_size)
    return tuple(images)
