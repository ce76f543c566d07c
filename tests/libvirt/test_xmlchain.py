"""libvirt's live XML read as disks and chains, and the names `spec.disk`/`spec.base` may use
(pure: no libvirtd)."""

from __future__ import annotations

import pytest

from blockpull.errors import BaseNotInChain, DiskNotFound
from blockpull.libvirt.xmlchain import parse_disks, pulled, resolve_base, resolve_disk

# As libvirt 9.0 writes it for a domain whose vda is top <- mid <- base (trimmed).
XML = """
<domain type='qemu' id='1'>
  <name>vms_web-1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/top.qcow2' index='1'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/images/mid.qcow2'/>
        <backingStore type='file' index='3'>
          <format type='raw'/>
          <source file='/images/base.img'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/data.qcow2' index='4'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>
"""


def test_parse() -> None:
    vda, vdb = parse_disks(XML)  # the empty cdrom has no source: not a disk to pull
    assert vda.target == "vda"
    assert [(i.node, i.filename, i.driver) for i in vda.images] == [
        ("vda", "/images/top.qcow2", "qcow2"),
        ("vda[2]", "/images/mid.qcow2", "qcow2"),
        ("vda[3]", "/images/base.img", "raw"),
    ]
    assert [i.filename for i in vdb.images] == ["/images/data.qcow2"]


@pytest.mark.parametrize("name", ["vda", "/images/top.qcow2"])
def test_disk_by_target_or_active_path(name: str) -> None:
    assert resolve_disk(parse_disks(XML), name).target == "vda"


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("vdz", "no disk 'vdz'"),
        ("/images/mid.qcow2", "backing image, not a disk"),
        ("virtio-disk0", "no disk"),
        ("sda", "no disk"),
    ],
)
def test_disk_refused(name: str, match: str) -> None:
    with pytest.raises(DiskNotFound, match=match):
        resolve_disk(parse_disks(XML), name)


@pytest.mark.parametrize(("base", "node"), [("/images/mid.qcow2", "vda[2]"), ("vda[3]", "vda[3]")])
def test_base(base: str, node: str) -> None:
    assert resolve_base(resolve_disk(parse_disks(XML), "vda"), base).node == node


@pytest.mark.parametrize(
    ("base", "match"),
    [
        ("/images/top.qcow2", "active image"),
        ("vda[1]", "no image vda\\[1\\]"),
        ("vda[9]", "no image"),
        ("vdb[2]", "another disk"),
        ("mid.qcow2", "absolute path"),
        ("/images/other.qcow2", "not in the backing chain"),
    ],
)
def test_base_refused(base: str, match: str) -> None:
    with pytest.raises(BaseNotInChain, match=match):
        resolve_base(resolve_disk(parse_disks(XML), "vda"), base)


def test_pulled() -> None:
    vda, vdb = parse_disks(XML)
    assert not pulled(vda, None)
    assert pulled(vda, "/images/mid.qcow2") and pulled(vda, "vda[2]")
    assert not pulled(vda, "vda[3]") and not pulled(vda, "/images/base.img")
    assert pulled(vdb, None) and not pulled(vdb, "vdb[2]")
