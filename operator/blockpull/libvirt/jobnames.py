"""Which disk a job id names on one libvirt domain: libvirt's block jobs have no ids.

Owns: the ids a libvirt job answers to and where each is kept. A disk has at most one job, so
`<domain>/<target>` (`connection.job_id_of`) always names it. The id a caller gave at start is
kept twice: in memory (`DomainJobs.aliases`, shared by every driver of the domain on the
connection) and in the domain's live metadata under BlockPull's namespace - libvirt's own
per-domain store, which outlives this process and libvirtd restarts and lasts exactly as long
as the running domain, like the job itself.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

import libvirt
from blockpull.errors import CommandFailed, Disconnected, HypervisorUnavailable, JobNotFound, VMNotFound
from blockpull.libvirt.connection import DomainJobs, LibvirtConnection, job_id_of

#: BlockPull's namespace in a domain's metadata: the job ids it started, by disk target.
METADATA_NS = "https://blockpull.dev/libvirt/jobs/v1"
METADATA_KEY = "blockpull"


class JobNames:
    """The job ids of domain `domain` (`describe` names it in errors).

    Its metadata calls go to the connection directly: a stopped domain is `VMNotFound` here,
    where `DomainView.call` would say `Disconnected`.
    """

    def __init__(self, conn: LibvirtConnection, domain: str, jobs: DomainJobs, describe: str) -> None:
        self.conn = conn
        self.domain = domain
        self.describe = describe
        self._jobs = jobs

    def target_of(self, job_id: str) -> str | None:
        """The disk target `job_id` names: an alias, the stable name, or a recorded id."""
        target = self._jobs.aliases.get(job_id)
        if target is not None:
            return target
        prefix = f"{self.domain}/"
        if job_id.startswith(prefix) and job_id[len(prefix) :]:
            return job_id[len(prefix) :]
        target = self._recorded().get(job_id)
        if target:
            self._jobs.aliases[job_id] = target
        return target or None

    def require(self, job_id: str) -> str:
        """`target_of`, or `JobNotFound` for an id that names nothing."""
        target = self.target_of(job_id)
        if target is None:
            raise JobNotFound(f"no block job {job_id!r} on {self.describe}")
        return target

    def remember(self, job_id: str, target: str) -> None:
        """In memory: `job_id` and the stable name both name `target`'s new job."""
        self._jobs.aliases[job_id] = target
        self._jobs.aliases[job_id_of(self.domain, target)] = target

    def forget(self, target: str) -> None:
        """Every name of `target`'s job, in memory and in the metadata: a later job on this disk
        is not this one. Best effort: a domain or libvirtd that is gone cannot be asked."""
        for alias in [a for a, t in self._jobs.aliases.items() if t == target]:
            del self._jobs.aliases[alias]
        with contextlib.suppress(VMNotFound, Disconnected, HypervisorUnavailable):
            self.record(None, target)

    def _recorded(self) -> dict[str, str]:
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

    def record(self, job_id: str | None, target: str) -> None:
        """Record `job_id` as the name of `target`'s job (None: forget `target`'s job)."""
        ids = {i: t for i, t in self._recorded().items() if t != target}
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
