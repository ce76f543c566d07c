"""qemulab: real qcow2 chains with known data, and real QEMU processes to stream into.

- `qemulab.patterns`: what each layer holds, and the model of what the guest sees.
- `qemulab.images`: build chains (`make_chain`, `make_big_chain`, `copy_chain`) and look at
  images (`compare`, `check`, `backing_chain`, `allocated_bytes`; from `qemulab.imageinfo`).
- `qemulab.cmdline`: how disks are attached (`Disk`, attach modes, blkdebug `InjectError`).
- `qemulab.vm`: `QemuVM`, a QEMU process with QMP monitors; `qmp_execute_once`.
- `qemulab.watcher`: `QemuWatcher`, records events with timestamps.
- `qemulab.pytest_plugin`: fixtures (`short_tmp`, `chain4`, `vm_factory`, ...).

Needs `qemu-img`, `qemu-io`, `qemu-system-x86_64` and `qemu-storage-daemon` on PATH.
"""

from __future__ import annotations

from qemulab.cmdline import EIO, ENOSPC, AttachedDisk, AttachMode, Disk, InjectError
from qemulab.errors import ImageCorrupt, LabError, ToolError, VMError, VMStartError
from qemulab.images import (
    Chain,
    CheckResult,
    add_reference,
    allocated_bytes,
    backing_chain,
    backing_chain_info,
    backing_names,
    check,
    compare,
    copy_chain,
    make_big_chain,
    make_chain,
)
from qemulab.patterns import Extent, Write
from qemulab.qmp import qmp_execute_once
from qemulab.tmpdirs import short_tmpdir
from qemulab.tools import qemu_available
from qemulab.vm import QemuVM
from qemulab.watcher import QemuWatcher, RecordedEvent

__all__ = [
    "EIO",
    "ENOSPC",
    "AttachMode",
    "AttachedDisk",
    "Chain",
    "CheckResult",
    "Disk",
    "Extent",
    "ImageCorrupt",
    "InjectError",
    "LabError",
    "QemuVM",
    "QemuWatcher",
    "RecordedEvent",
    "ToolError",
    "VMError",
    "VMStartError",
    "Write",
    "add_reference",
    "allocated_bytes",
    "backing_chain",
    "backing_chain_info",
    "backing_names",
    "check",
    "compare",
    "copy_chain",
    "make_big_chain",
    "make_chain",
    "qemu_available",
    "qmp_execute_once",
    "short_tmpdir",
]
