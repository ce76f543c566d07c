"""Transient TCG domains on the private libvirtd, with real qcow2 chains as disks.

A domain is `<domain type='qemu'>` (TCG: no /dev/kvm needed), 64 MiB, machine `pc`, no
graphics, usb and balloon off, created PAUSED (no guest runs: the block layer is all a pull
needs, and a paused guest writes nothing). Its disks are `<disk type='file'>` qcow2 images
given by their active image only, with no `<backingStore>`: libvirt detects each chain from
the image headers (which therefore record the backing format, `-F`).

Everything goes through `virsh` (a process of its own), never through the code under test,
and never through `qemu-monitor-command`, which would taint the domain.
"""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from qemulab.errors import LabError
from qemulab.images import Chain
from virtlab.daemon import LibvirtDaemon

#: What the domain log says about taints, e.g. `Domain id=1 is tainted: high-privileges`.
_TAINT = re.compile(r"is tainted: ([\w-]+)")
#: QEMU runs as root in this lab: libvirt marks that once per domain start, as expected.
EXPECTED_TAINTS = frozenset({"high-privileges"})


class VirshError(LabError):
    """`virsh` failed."""


def virsh(uri: str, *args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run `virsh -c URI ARGS...`; its stdout, or `VirshError` with virsh's message."""
    argv = ["virsh", "-q", "-c", uri, *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise VirshError(f"{' '.join(argv)} timed out after {timeout} s") from exc
    if check and done.returncode != 0:
        raise VirshError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class DomainDisk:
    """One disk: its active image, as libvirt's target (`vda`, `vdb`...)."""

    target: str
    image: Path
    chain: Chain | None = None


def disk_xml(disk: DomainDisk) -> str:
    return (
        "<disk type='file' device='disk'>"
        "<driver name='qemu' type='qcow2'/>"
        f"<source file={quoteattr(str(disk.image))}/>"
        f"<target dev={quoteattr(disk.target)} bus='virtio'/>"
        "</disk>"
    )


def domain_xml(name: str, disks: Sequence[DomainDisk], memory_mib: int = 64) -> str:
    """A minimal TCG domain with `disks`."""
    devices = "".join(disk_xml(d) for d in disks)
    return (
        "<domain type='qemu'>"
        f"<name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory>"
        "<vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        "<devices>"
        f"{devices}"
        "<controller type='usb' model='none'/>"
        "<memballoon model='none'/>"
        "</devices>"
        "</domain>"
    )


def xml_chain(domain_xml_text: str, target: str) -> list[str]:
    """The disk's chain in libvirt's live XML: the active image's path first, then each
    `<backingStore>` down to the bottom (an empty `<backingStore/>` ends the chain)."""
    root = ET.fromstring(domain_xml_text)
    for disk in root.iterfind("./devices/disk"):
        tgt = disk.find("target")
        if tgt is None or tgt.get("dev") != target:
            continue
        chain: list[str] = []
        node: ET.Element | None = disk
        while node is not None:
            source = node.find("source")
            if source is None:
                break
            chain.append(source.get("file") or source.get("dev") or source.get("name") or "")
            node = node.find("backingStore")
        return chain
    raise LabError(f"no disk with target {target!r} in the domain XML")


class Domain:
    """A transient domain on the lab's libvirtd; `destroy()` ends it (the fixture does)."""

    def __init__(self, daemon: LibvirtDaemon, name: str, disks: Sequence[DomainDisk]) -> None:
        self.daemon = daemon
        self.name = name
        self.disks = list(disks)
        self._log_offset = 0

    @property
    def uri(self) -> str:
        return self.daemon.uri

    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        return virsh(self.uri, *args, check=check, timeout=timeout)

    def create(self, *, paused: bool = True) -> Domain:
        """Start it (paused by default); the domain log's taints are counted from here."""
        xml_file = self.daemon.directory / f"{self.name}.xml"
        xml_file.write_text(domain_xml(self.name, self.disks))
        log = self.log_path
        self._log_offset = log.stat().st_size if log.exists() else 0
        self.virsh("create", *(["--paused"] if paused else []), str(xml_file))
        return self

    @property
    def active(self) -> bool:
        return self.name in self.virsh("list", "--name").split()

    def destroy(self) -> None:
        """Stop the QEMU (a transient domain is then gone); nothing if it is not running."""
        if self.daemon.running and self.active:
            self.virsh("destroy", self.name, check=False)

    def live_xml(self) -> str:
        return self.virsh("dumpxml", self.name)

    def xml_chain(self, target: str = "vda") -> list[str]:
        """The disk's backing chain as libvirt knows it now (live XML), top first."""
        return xml_chain(self.live_xml(), target)

    def disk(self, target: str = "vda") -> DomainDisk:
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)

    @property
    def log_path(self) -> Path:
        return self.daemon.domain_log(self.name)

    def log_text(self) -> str:
        """This domain's log since `create()`."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def taints(self) -> set[str]:
        """Every taint libvirt logged for this domain since `create()`."""
        return set(_TAINT.findall(self.log_text()))

    def unexpected_taints(self) -> set[str]:
        """Taints beyond the lab's expected `high-privileges` (e.g. `custom-monitor`)."""
        return self.taints() - EXPECTED_TAINTS

    def block_job_info(self, target: str = "vda") -> str:
        """`virsh blockjob DISK --info --bytes` (empty text when there is no job)."""
        return self.virsh("blockjob", self.name, target, "--info", "--bytes", check=False)

    def __repr__(self) -> str:
        return f"Domain({self.name!r} on {self.uri})"
