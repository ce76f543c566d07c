"""QEMU command lines: how each disk is attached, and the monitors.

Pure functions and dataclasses, no processes: `Disk` says how one chain is attached,
`AttachedDisk` is the same with every name resolved (what a test asserts against), and
`build_argv` assembles the whole command line for `qemu-system-x86_64` or
`qemu-storage-daemon`.

Attach modes:

- `"blockdev"`: libvirt style, one JSON `-blockdev` per protocol (`file`) and format
  (`qcow2`) node, bottom first, each format node naming its backing node explicitly
  (`"backing": null` at the bottom). Lower layers are read-only, their file nodes
  `auto-read-only` (as libvirt does). Optional `blkdebug` nodes between a format node and its
  file node inject I/O errors.
- `"blockdev-auto"`: only the top format node (with its file child) is given; QEMU opens the
  backing chain from the image headers, with automatic node names (`#blockNNN`).
- `"drive"`: `-drive file=TOP,if=none,id=DRIVE` (QEMU opens the chain from the headers).
- `"device"`: like `"drive"`, plus a `virtio-blk-pci` guest device; the machine becomes
  `-M pc -S` (paused, no guest code runs).

A `Disk` in a blockdev mode with a `device_id` also gets a guest device on its top node, the
way libvirt attaches disks (needs the `pc` machine too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qemulab.images import Chain

AttachMode = Literal["blockdev", "blockdev-auto", "drive", "device"]
VMKind = Literal["system", "storage-daemon"]
ATTACH_MODES: tuple[AttachMode, ...] = ("blockdev", "blockdev-auto", "drive", "device")

EIO = 5
ENOSPC = 28


@dataclass(frozen=True)
class InjectError:
    """One blkdebug `inject-error` rule.

    `sector` counts 512-byte sectors of the layer's own FILE (not guest offsets): use
    `imageinfo.host_offset(layer, guest_offset) // 512`. Without a sector every matching
    request fails, including the metadata reads when the image is opened. `once` fails only
    the first matching request.
    """

    event: str = "read_aio"
    errno: int = EIO
    sector: int | None = None
    once: bool = False
    immediately: bool = False
    state: int | None = None

    def to_qapi(self) -> dict[str, object]:
        """The rule as QAPI JSON (`BlkdebugInjectErrorOptions`)."""
        rule: dict[str, object] = {"event": self.event, "errno": self.errno}
        if self.sector is not None:
            rule["sector"] = self.sector
        if self.once:
            rule["once"] = True
        if self.immediately:
            rule["immediately"] = True
        if self.state is not None:
            rule["state"] = self.state
        return rule


@dataclass(frozen=True)
class Disk:
    """How to attach one chain to a VM. Names left None are filled in by position.

    - `images`: a `Chain`, or image paths bottom (base) to top.
    - `name`: prefix of the node names (default `disk{k}` for the k-th disk).
    - `file_node` / `format_node` / `blkdebug_node`: node-name templates, with `{name}` and
      `{i}` (the layer index, 0 = base) (blockdev modes).
    - `drive_id`: the `-drive` id (default `drive{k}`) in the drive and device modes.
    - `node_name`: a node-name for the top format node in the drive/device modes (default
      none: QEMU picks `#blockNNN`); in blockdev-auto the top format node's name (default
      from `format_node`).
    - `device_id`: qdev id of a virtio-blk-pci guest device (default `vd{a+k}` in device
      mode; None = no device in the other modes).
    - `inject`: blkdebug rules per layer index (negative indexes count from the top),
      blockdev mode only.
    - `backing_read_only`: open the layers below the top read-only (blockdev mode).
    """

    images: Chain | Sequence[Path | str]
    attach: AttachMode = "blockdev"
    name: str | None = None
    file_node: str = "{name}-f{i}"
    format_node: str = "{name}-fmt{i}"
    blkdebug_node: str = "{name}-dbg{i}"
    drive_id: str | None = None
    node_name: str | None = None
    device_id: str | None = None
    inject: Mapping[int, Sequence[InjectError]] = field(default_factory=dict)
    backing_read_only: bool = True
    image_format: str = "qcow2"

    def paths(self) -> list[Path]:
        """The image paths, bottom to top, absolute."""
        images = self.images.images if isinstance(self.images, Chain) else self.images
        paths = [Path(p).absolute() for p in images]
        if not paths:
            raise ValueError("a disk needs at least one image")
        return paths

    def resolve(self, index: int) -> AttachedDisk:
        """Fill in the default names for the `index`-th disk of a VM; check the options."""
        if self.attach not in ATTACH_MODES:
            raise ValueError(f"unknown attach mode {self.attach!r}")
        paths = self.paths()
        n = len(paths)
        name = self.name or f"disk{index}"
        inject: dict[int, tuple[InjectError, ...]] = {}
        for layer, rules in self.inject.items():
            if not -n <= layer < n:
                raise ValueError(f"blkdebug layer {layer} out of range for {n} images")
            inject[layer % n] = tuple(rules)
        if inject and self.attach != "blockdev":
            raise ValueError("blkdebug injection needs attach='blockdev'")
        device_id = self.device_id
        if self.attach == "device" and device_id is None:
            device_id = f"vd{chr(ord('a') + index)}"
        file_nodes: list[str] = []
        format_nodes: list[str] = []
        blkdebug_nodes: dict[int, str] = {}
        drive_id: str | None = None
        if self.attach == "blockdev":
            file_nodes = [self.file_node.format(name=name, i=i) for i in range(n)]
            format_nodes = [self.format_node.format(name=name, i=i) for i in range(n)]
            blkdebug_nodes = {i: self.blkdebug_node.format(name=name, i=i) for i in inject}
            top = format_nodes[-1]
        elif self.attach == "blockdev-auto":
            file_nodes = [self.file_node.format(name=name, i=n - 1)]
            format_nodes = [self.node_name or self.format_node.format(name=name, i=n - 1)]
            top = format_nodes[0]
        else:
            drive_id = self.drive_id or f"drive{index}"
            top = self.node_name or drive_id
        return AttachedDisk(
            name=name,
            attach=self.attach,
            images=paths,
            file_nodes=file_nodes,
            format_nodes=format_nodes,
            blkdebug_nodes=blkdebug_nodes,
            inject=inject,
            drive_id=drive_id,
            node_name=self.node_name,
            device_id=device_id,
            top=top,
            backing_read_only=self.backing_read_only,
            image_format=self.image_format,
        )


@dataclass(frozen=True)
class AttachedDisk:
    """A disk with every name resolved.

    `top` is what to pass as block-stream's `device`: the top format node-name in the blockdev
    modes, the drive id (or `node_name` if given) in the drive modes. `file_nodes` and
    `format_nodes` run bottom to top (in blockdev-auto they hold the top's only).
    """

    name: str
    attach: AttachMode
    images: list[Path]
    file_nodes: list[str]
    format_nodes: list[str]
    blkdebug_nodes: dict[int, str]
    inject: dict[int, tuple[InjectError, ...]]
    drive_id: str | None
    node_name: str | None
    device_id: str | None
    top: str
    backing_read_only: bool
    image_format: str

    @property
    def needs_pc_machine(self) -> bool:
        """Whether a guest device is attached (so the machine must be `pc`, paused)."""
        return self.device_id is not None

    def node_for(self, image: Path | str) -> str:
        """The format node-name of a layer (blockdev mode), by path or file name."""
        for path, node in zip(self.images, self.format_nodes, strict=False):
            if str(image) in (str(path), path.name, path.stem):
                return node
        raise KeyError(image)

    def blockdevs(self) -> list[dict[str, object]]:
        """The `-blockdev` JSON objects, bottom first (blockdev modes; empty otherwise)."""
        if self.attach == "blockdev-auto":
            top_file = {"driver": "file", "node-name": self.file_nodes[0]}
            top_file["filename"] = str(self.images[-1])
            return [
                {
                    "driver": self.image_format,
                    "node-name": self.format_nodes[0],
                    "file": top_file,
                }
            ]
        if self.attach != "blockdev":
            return []
        nodes: list[dict[str, object]] = []
        below: str | None = None
        last = len(self.images) - 1
        for i, path in enumerate(self.images):
            read_only = self.backing_read_only and i < last
            nodes.append(
                {
                    "driver": "file",
                    "node-name": self.file_nodes[i],
                    "filename": str(path),
                    "auto-read-only": True,
                    "discard": "unmap",
                }
            )
            child = self.file_nodes[i]
            if i in self.inject:
                nodes.append(
                    {
                        "driver": "blkdebug",
                        "node-name": self.blkdebug_nodes[i],
                        "image": child,
                        "inject-error": [rule.to_qapi() for rule in self.inject[i]],
                    }
                )
                child = self.blkdebug_nodes[i]
            nodes.append(
                {
                    "driver": self.image_format,
                    "node-name": self.format_nodes[i],
                    "read-only": read_only,
                    "file": child,
                    "backing": below,
                }
            )
            below = self.format_nodes[i]
        return nodes

    def drive_arg(self) -> str | None:
        """The `-drive` option string (drive and device modes; None otherwise)."""
        if self.drive_id is None:
            return None
        parts = [
            f"file={_escape(str(self.images[-1]))}",
            f"format={self.image_format}",
            "if=none",
            f"id={self.drive_id}",
        ]
        if self.node_name:
            parts.append(f"node-name={self.node_name}")
        return ",".join(parts)

    def device_arg(self) -> str | None:
        """The `-device` option string, if the disk has a guest device."""
        if self.device_id is None:
            return None
        backend = self.drive_id if self.drive_id is not None else self.top
        return f"virtio-blk-pci,drive={backend},id={self.device_id}"


def _escape(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class Monitor:
    """A QMP monitor socket: `main` is the `-qmp` one, the others `-chardev`+`-mon`."""

    id: str
    path: Path
    main: bool = False


def build_argv(
    kind: VMKind,
    disks: Sequence[AttachedDisk],
    monitors: Sequence[Monitor],
    *,
    binary: str,
    machine: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The full command line. `machine` overrides the automatic choice (`none`, or `pc` with
    `-S` when a disk has a guest device)."""
    if kind == "storage-daemon":
        return _storage_daemon_argv(disks, monitors, binary, extra_args)
    argv = [binary, "-nodefaults", "-display", "none", "-no-user-config"]
    needs_pc = any(d.needs_pc_machine for d in disks)
    argv += ["-M", machine or ("pc" if needs_pc else "none")]
    if needs_pc:
        argv += ["-S", "-m", "64"]
    for mon in monitors:
        sock = _escape(str(mon.path))
        if mon.main:
            argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
        else:
            argv += ["-chardev", f"socket,id={mon.id},path={sock},server=on,wait=off"]
            argv += ["-mon", f"chardev={mon.id},mode=control"]
    for disk in disks:
        for node in disk.blockdevs():
            argv += ["-blockdev", json.dumps(node)]
        drive = disk.drive_arg()
        if drive is not None:
            argv += ["-drive", drive]
    for disk in disks:
        device = disk.device_arg()
        if device is not None:
            argv += ["-device", device]
    return argv + list(extra_args)


def _storage_daemon_argv(
    disks: Sequence[AttachedDisk],
    monitors: Sequence[Monitor],
    binary: str,
    extra_args: Sequence[str],
) -> list[str]:
    argv = [binary]
    for mon in monitors:
        sock = _escape(str(mon.path))
        argv += ["--chardev", f"socket,id={mon.id},path={sock},server=on,wait=off"]
        argv += ["--monitor", f"chardev={mon.id}"]
    for disk in disks:
        if disk.attach not in ("blockdev", "blockdev-auto") or disk.device_id is not None:
            raise ValueError(
                f"the storage daemon takes blockdev disks without guest devices, not {disk.attach}"
            )
        for node in disk.blockdevs():
            argv += ["--blockdev", json.dumps(node)]
    return argv + list(extra_args)
