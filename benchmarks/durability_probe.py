"""Durability probe: does a pulled disk survive QEMU being killed when nobody was watching?

For each mode, N times: a fresh two-image chain with known data, a real QEMU (`-M none`), a
`block-stream` started and left alone (the client disconnects, as an agent that was killed or a
`blockpull pull --no-wait` does), then QEMU SIGKILLed 1.5 s later, long after the copy ended.
The top image is then checked as its own header chains it (`qemu-img compare` against the
guest's data, flattened beforehand):

- `auto-finalize=true` (QEMU's default, BlockPull before 2026-12): the header already says "no
  backing file" while the copied clusters' metadata was only in QEMU's cache;
- `auto-finalize=false` (BlockPull now): the job waits at `pending`, the chain unchanged.

Run: `.venv/bin/python benchmarks/durability_probe.py [--runs 5]`. Prints one line per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
from pathlib import Path

from qemu.qmp import QMPClient

MiB = 1 << 20


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


def make_chain(directory: Path) -> tuple[Path, Path]:
    base, top, reference = directory / "base.qcow2", directory / "top.qcow2", directory / "guest.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    run("qemu-io", "-c", "write -P 0x11 0 32M", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    run("qemu-io", "-c", "write -P 0x22 40M 4M", str(top))
    run("qemu-img", "convert", "-O", "raw", str(top), str(reference))
    return top, reference


async def once(auto_finalize: bool, directory: Path) -> tuple[bool, int]:
    """(the guest's data intact, images in the header's chain) after the kill."""
    top, reference = make_chain(directory)
    socket = directory / "qmp.sock"
    qemu = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
        "-qmp", f"unix:{socket},server=on,wait=off",
        "-drive", f"file={top},if=none,id=drive0,node-name=top",
    )  # fmt: skip
    try:
        for _ in range(100):
            if socket.exists():
                break
            await asyncio.sleep(0.02)
        client = QMPClient("probe")
        async with asyncio.timeout(10):
            await client.connect(str(socket))
            await client.execute(
                "block-stream",
                {"job-id": "j", "device": "top", "auto-finalize": auto_finalize, "auto-dismiss": False},
            )
            await client.disconnect()  # nobody watches from here on
        await asyncio.sleep(1.5)
    finally:
        qemu.kill()
        await qemu.wait()
    intact = run("qemu-img", "compare", str(top), str(reference)).returncode == 0
    chain = run("qemu-img", "info", "--backing-chain", str(top)).stdout.count("image:")
    return intact, chain


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for auto_finalize in (True, False):
        results = []
        for index in range(args.runs):
            with tempfile.TemporaryDirectory(prefix=f"probe{index}-") as directory:
                results.append(await once(auto_finalize, Path(directory)))
        intact = sum(ok for ok, _ in results)
        chains = sorted({chain for _, chain in results})
        print(
            f"auto-finalize={str(auto_finalize).lower():5}  intact after SIGKILL: {intact}/{args.runs}"
            f"  images in the header's chain: {chains}"
        )


if __name__ == "__main__":
    asyncio.run(main())
