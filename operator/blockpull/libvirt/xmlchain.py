"""A domain's disks and their backing chains, read from libvirt's live XML (pure functions).

Owns: how `spec.disk` and `spec.base` name things for libvirt, and what the XML says about a
chain. libvirt (9.0, with `-blockdev`) writes each disk as

    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/top.qcow2' index='1'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>

- A disk is named by its target (`vda`) or the absolute path of its active image; libvirt
  refuses anything else (the alias, a backing image's path).
- A base is an absolute path in the chain or the index form `vda[N]`; the active image (index
  1) is not a base. Indexes are libvirt's: they stay with their image when a pull removes the
  images above it.
- After a full pull the active image is followed by an empty `<backingStore/>`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from blockpull.driver import ChainImage
from blockpull.errors import BaseNotInChain, DiskNotFound

_INDEX_FORM = re.compile(r"^(?P<target>[A-Za-z0-9_-]+)\[(?P<index>[0-9]+)\]$")


@dataclass(frozen=True)
class XmlDisk:
    """One disk of the live XML: its target and its chain, active image first."""

    target: str
    images: tuple[ChainImage, ...]

    @property
    def active_path(self) -> str:
        return self.images[0].filename if self.images else ""


def _source_name(source: ET.Element | None) -> str:
    if source is None:
        return ""
    return source.get("file") or source.get("dev") or source.get("name") or source.get("dir") or ""


def _index_of(element: ET.Element, source: ET.Element | None) -> str | None:
    # libvirt puts the active image's index on <source>, a backing image's on <backingStore>.
    return element.get("index") or (source.get("index") if source is not None else None)


def parse_disks(domain_xml: str) -> list[XmlDisk]:
    """Every `<disk>` with a target and a source, in XML order."""
    root = ET.fromstring(domain_xml)
    disks: list[XmlDisk] = []
    for disk in root.iterfind("./devices/disk"):
        target_el = disk.find("target")
        target = target_el.get("dev") if target_el is not None else None
        if not target:
            continue
        images: list[ChainImage] = []
        driver_el = disk.find("driver")
        fmt = driver_el.get("type", "") if driver_el is not None else ""
        node: ET.Element | None = disk
        while node is not None:
            source = node.find("source")
            name = _source_name(source)
            if not name:
                break
            index = _index_of(node, source) if node is not disk else None
            if node is disk:
                label = target
            else:
                label = f"{target}[{index}]" if index else name
                fmt_el = node.find("format")
                fmt = fmt_el.get("type", "") if fmt_el is not None else ""
            images.append(ChainImage(node=label, filename=name, driver=fmt))
            node = node.find("backingStore")
        if images:
            disks.append(XmlDisk(target, tuple(images)))
    return disks


def resolve_disk(disks: list[XmlDisk], name: str) -> XmlDisk:
    """The disk named by its target or its active image's absolute path."""
    for disk in disks:
        if name == disk.target or (name.startswith("/") and name == disk.active_path):
            return disk
    known = ", ".join(f"{d.target} ({d.active_path})" for d in disks) or "none"
    if name.startswith("/") and any(name == i.filename for d in disks for i in d.images[1:]):
        raise DiskNotFound(
            f"{name} is a backing image, not a disk: name the disk by its target or the path of "
            f"its active image (disks: {known})"
        )
    raise DiskNotFound(f"the domain has no disk {name!r} (disks by target and active image: {known})")


def resolve_base(disk: XmlDisk, base: str) -> ChainImage:
    """The image of `disk`'s chain that `base` names (absolute path or `vda[N]`), never the
    active image."""
    below = disk.images[1:]
    chain_text = " -> ".join(f"{i.node} {i.filename}" for i in disk.images)
    match = _INDEX_FORM.match(base)
    if match:
        if match["target"] != disk.target:
            raise BaseNotInChain(
                f"base {base!r} names another disk than {disk.target!r} (chain: {chain_text})"
            )
        for image in below:
            if image.node == base:
                return image
        raise BaseNotInChain(f"no image {base} below the active image of {disk.target} (chain: {chain_text})")
    if not base.startswith("/"):
        raise BaseNotInChain(
            f"base {base!r} must be an absolute path in the chain or libvirt's index form "
            f"({disk.target}[N]) (chain: {chain_text})"
        )
    for image in below:
        if image.filename == base:
            return image
    if disk.images and disk.images[0].filename == base:
        raise BaseNotInChain(f"{base} is the active image of {disk.target}, not a base below it")
    raise BaseNotInChain(f"{base} is not in the backing chain of {disk.target} (chain: {chain_text})")


def pulled(disk: XmlDisk, base: str | None) -> bool:
    """Whether the chain shows the pull done: nothing below the active image (no base), or
    the base (by path or index form) right below it."""
    if base is None:
        return len(disk.images) == 1
    if len(disk.images) < 2:
        return False
    below = disk.images[1]
    return base in (below.filename, below.node)
