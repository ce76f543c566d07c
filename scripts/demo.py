"""The BlockPull demo: flatten a live QEMU disk and prove it with qemu-img.

Builds a real three-image qcow2 chain with known data (template <- mid <- active), starts a
real QEMU (no guest: `-M none`) with the chain attached libvirt-style and a QMP monitor, runs
`blockpull chain` and `blockpull pull` against it, then checks the result with `qemu-img`.
Everything it starts is stopped again, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qemulab.images import make_chain
from qemulab.vm import QemuVM

MiB = 1 << 20


def run(*argv: str) -> None:
    print(f"\n$ {' '.join(argv)}", flush=True)
    subprocess.run(argv, check=True)


async def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="blockpull-demo-", dir="/tmp"))
    try:
        chain = make_chain(
            workdir / "images", layers=3, size=256 * MiB, names=["template", "mid", "web-1-root"]
        )
        print(f"chain in {chain.directory}: " + " <- ".join(p.name for p in chain.images))
        async with QemuVM([chain]) as vm:
            disk = vm.disks[0].top
            socket = str(vm.qmp_socket)
            run("blockpull", "chain", socket, disk)
            run("blockpull", "pull", socket, disk, "--bandwidth", "64Mi")
            run("blockpull", "chain", socket, disk)
        print("\nQEMU stopped; checking the image on disk:")
        run("qemu-img", "info", "--backing-chain", str(chain.top))
        run("qemu-img", "check", str(chain.top))
        assert chain.reference is not None
        run("qemu-img", "compare", str(chain.top), str(chain.reference))
        print("\nThe active image needs no backing file and holds exactly what the guest saw before.")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
