"""Real QEMU processes (no guest) over real qcow2 chains, for the engine tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blockpull.errors import BlockPullError
from blockpull.qmp import QMPConnection
from qemulab.images import Chain, make_chain

pytestmark = pytest.mark.qemu


@dataclass
class VM:
    proc: subprocess.Popen[bytes]
    socket: str
    chain: Chain
    node_names: list[str] = field(default_factory=list)  # format nodes, bottom first
    spare_socket: str | None = (
        None  # a second monitor, for watching while the code under test holds the first
    )
    stopped: bool = False  # stopped or killed on purpose by the test

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def top_node(self) -> str:
        return self.node_names[-1] if self.node_names else "drive0"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.stopped = True
        self.proc.send_signal(sig)


def blockdev_args(
    chain: Chain, *, prefix: str = "d0", blkdebug: dict[int, list[dict[str, Any]]] | None = None
) -> tuple[list[str], list[str]]:
    """libvirt-style -blockdev: a file node and a format node per image, backing by reference."""
    args: list[str] = []
    names: list[str] = []
    for index, image in enumerate(chain.images):
        file_node, fmt_node = f"{prefix}-file{index}", f"{prefix}-fmt{index}"
        args += ["-blockdev", json.dumps({"driver": "file", "node-name": file_node, "filename": str(image)})]
        child = file_node
        if blkdebug and index in blkdebug:
            child = f"{prefix}-dbg{index}"
            args += [
                "-blockdev",
                json.dumps(
                    {
                        "driver": "blkdebug",
                        "node-name": child,
                        "image": file_node,
                        "inject-error": blkdebug[index],
                    }
                ),
            ]
        backing = names[-1] if names else None
        args += [
            "-blockdev",
            json.dumps({"driver": "qcow2", "node-name": fmt_node, "file": child, "backing": backing}),
        ]
        names.append(fmt_node)
    return args, names


async def start_vm(
    workdir: Path,
    chain: Chain,
    *,
    mode: str = "blockdev",
    blkdebug: dict[int, list[dict[str, Any]]] | None = None,
    spare_monitor: bool = False,
) -> VM:
    socket = str(workdir / "qmp.sock")
    argv = [
        "qemu-system-x86_64",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
        f"unix:{socket},server=on,wait=off",
    ]
    names: list[str] = []
    if mode == "blockdev":
        argv += ["-M", "none"]
        extra, names = blockdev_args(chain, blkdebug=blkdebug)
        argv += extra
    elif mode == "drive":
        argv += ["-M", "none", "-drive", f"file={chain.top},if=none,id=drive0,format=qcow2"]
    elif mode == "device":
        # A real machine, started paused (-S): a guest device exists, no guest code runs.
        argv += ["-M", "pc", "-S", "-drive", f"file={chain.top},if=none,id=drive0,format=qcow2",
                 "-device", "virtio-blk-pci,drive=drive0,id=vda"]  # fmt: skip
    else:
        raise ValueError(mode)
    spare = None
    if spare_monitor:
        spare = str(workdir / "spare.sock")
        argv += [
            "-chardev",
            f"socket,id=spare,path={spare},server=on,wait=off",
            "-mon",
            "chardev=spare,mode=control",
        ]
    # Popen returns as soon as QEMU is forked; readiness is awaited below.
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: ASYNC220
    vm = VM(proc, socket, chain, names, spare)
    # The socket appears before -blockdev is parsed; ready means QEMU answers a command.
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        with contextlib.suppress(BlockPullError):
            conn = await QMPConnection.open(socket, connect_timeout=1)
            await conn.execute("query-status")
            await conn.close()
            return vm
        await asyncio.sleep(0.05)
    raise RuntimeError("QEMU did not become ready")


def stop_vm(vm: VM) -> None:
    """Stop QEMU the way a VM is shut down (SIGTERM: QEMU flushes and exits)."""
    vm.stopped = True
    if vm.alive:
        vm.proc.terminate()
        try:
            vm.proc.wait(10)
        except subprocess.TimeoutExpired:
            vm.proc.kill()
    vm.proc.wait(10)
    if vm.proc.stderr:
        vm.proc.stderr.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="bpe-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def chain4(workdir: Path) -> Chain:
    return make_chain(workdir / "img", layers=4, size=64 << 20)


@pytest.fixture
async def vm(workdir: Path, chain4: Chain) -> AsyncIterator[VM]:
    machine = await start_vm(workdir, chain4, spare_monitor=True)
    yield machine
    stop_vm(machine)


@pytest.fixture
async def conn(vm: VM) -> AsyncIterator[QMPConnection]:
    connection = await QMPConnection.open(vm.socket, connect_timeout=2, command_timeout=5)
    yield connection
    await connection.close()
    assert vm.alive or vm.stopped, "QEMU died during the test"


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def backing_of(image: Path) -> str | None:
    info = json.loads(qemu_img("info", "-U", "--output=json", str(image)).stdout)
    return info.get("backing-filename")


def assert_intact(chain: Chain) -> None:
    """Chain consistent and the guest's data unchanged (run with QEMU stopped or -U)."""
    check = qemu_img("check", "-U", str(chain.top))
    assert check.returncode == 0, check.stdout + check.stderr
    assert chain.matches(force_share=True), "the disk's content differs from the reference"


def os_exists(path: str) -> bool:
    return os.path.exists(path)
