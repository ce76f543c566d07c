"""Real QEMU processes started by the lab: attach modes, monitors, faults, lifecycle."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from qemulab.cmdline import Disk, InjectError
from qemulab.errors import LabError, ToolError, VMStartError
from qemulab.imageinfo import backing_chain, host_offset
from qemulab.images import Chain
from qemulab.pytest_plugin import VMFactory
from qemulab.qmp import execute_once, qmp_execute_once
from qemulab.vm import QemuVM
from qemulab.watcher import QemuWatcher

pytestmark = pytest.mark.qemu

MiB = 1024 * 1024


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _node_names(vm: QemuVM) -> list[str]:
    # Safe here: no stream job exists (query-named-block-nodes crashes QEMU 7.2 while a stream
    # job is concluded and not dismissed).
    return await vm.node_names()


async def test_blockdev_mode_names_every_node(chain4: Chain) -> None:
    async with QemuVM([Disk(chain4, attach="blockdev")]) as vm:
        names = await _node_names(vm)
        assert set(names) == {f"disk0-f{i}" for i in range(4)} | {f"disk0-fmt{i}" for i in range(4)}
        assert vm.disks[0].top == "disk0-fmt3"
        assert vm.disks[0].node_for("mid1") == "disk0-fmt1"
        assert await vm.execute("query-block") == []
        status: Any = await vm.execute("query-status")
        assert status["status"] == "running"


async def test_blockdev_auto_mode_opens_backing_from_headers(chain4: Chain) -> None:
    async with QemuVM([Disk(chain4, attach="blockdev-auto", name="vda")]) as vm:
        names = await _node_names(vm)
        assert "vda-fmt3" in names
        assert "vda-f3" in names
        auto = [n for n in names if n.startswith("#block")]
        assert len(auto) == 6  # three backing images, a format and a file node each
        assert vm.disks[0].top == "vda-fmt3"


@pytest.mark.parametrize("node_name", [None, "top0"])
async def test_drive_mode_shows_the_chain_in_query_block(chain4: Chain, node_name: str | None) -> None:
    async with QemuVM([Disk(chain4, attach="drive", node_name=node_name)]) as vm:
        blocks: Any = await vm.execute("query-block")
        (block,) = blocks
        assert block["device"] == "drive0"
        image = block["inserted"]["image"]
        depth = 0
        while "backing-image" in image:
            image = image["backing-image"]
            depth += 1
        assert depth == 3
        assert image["filename"] == str(chain4.base)
        if node_name:
            assert block["inserted"]["node-name"] == node_name
        assert vm.disks[0].top == (node_name or "drive0")


async def test_device_mode_is_paused_with_a_guest_device(chain4: Chain) -> None:
    async with QemuVM([Disk(chain4, attach="device")]) as vm:
        blocks: Any = await vm.execute("query-block")
        (block,) = blocks
        assert block["device"] == "drive0"
        assert "vda" in block["qdev"]
        status: Any = await vm.execute("query-status")
        assert status["status"] == "prelaunch"
        assert "-S" in vm.argv


async def test_libvirt_style_blockdev_with_device(chain4: Chain) -> None:
    async with QemuVM([Disk(chain4, device_id="virtio-disk0")]) as vm:
        blocks: Any = await vm.execute("query-block")
        (block,) = blocks
        assert block["device"] == ""
        assert block["inserted"]["node-name"] == "disk0-fmt3"
        assert "virtio-disk0" in block["qdev"]


async def test_storage_daemon_and_several_disks(chain4: Chain, chain_factory: Any) -> None:
    other = chain_factory(layers=2, size=8 * MiB)
    disks = [Disk(chain4), Disk(other, attach="blockdev-auto")]
    async with QemuVM(disks, kind="storage-daemon", extra_monitors=1) as vm:
        names = await _node_names(vm)
        assert "disk0-fmt3" in names
        assert "disk1-fmt1" in names
        version: Any = await execute_once(vm.extra_sockets[0], "query-version")
        assert version["qemu"]["major"] >= 7
    assert vm.returncode == 0


async def test_blkdebug_node_injects_read_errors(chain4: Chain) -> None:
    # Data only the base holds (22-24 MiB in the default pattern): streaming must read it.
    sector = host_offset(chain4.base, 23 * MiB) // 512
    disk = Disk(chain4, inject={0: [InjectError(sector=sector, errno=5)]})
    async with QemuVM([disk], extra_monitors=1) as vm:
        assert "disk0-dbg0" in await _node_names(vm)
        async with QemuWatcher(vm.extra_sockets[0]) as watcher:
            await execute_once(vm.qmp_socket, "block-stream", {"job-id": "s1", "device": "disk0-fmt3"})
            done = await watcher.wait_for("BLOCK_JOB_COMPLETED", job_id="s1")
        assert done.data["error"] == "Input/output error"
    # The chain is intact: the failed stream kept every backing file.
    assert len(backing_chain(chain4.top)) == 4
    assert chain4.matches()


async def test_bad_blockdev_fails_readiness_with_qemu_message(chain4: Chain, short_tmp: Path) -> None:
    vm = QemuVM([Disk([*chain4.images[:-1], short_tmp / "missing.qcow2"])])
    with pytest.raises(VMStartError, match=r"missing\.qcow2"):
        await vm.start()
    assert not vm.alive
    assert vm.pid is not None and _gone(vm.pid)
    await vm.stop()
    assert not vm.socket_dir.exists()


async def test_main_socket_is_free_after_start(chain4: Chain) -> None:
    async with QemuVM([chain4], control_monitor=False) as vm:
        # readiness went through the single-client -qmp socket and let it go
        status: Any = await execute_once(vm.qmp_socket, "query-status", timeout=2)
        assert status["running"] is True
        assert vm.control_socket is None
    assert vm.returncode == 0


async def test_monitors_serve_clients_at_once(chain4: Chain) -> None:
    async with QemuVM([chain4], extra_monitors=2) as vm:
        assert len(vm.extra_sockets) == 2
        assert all(len(str(p)) < 108 for p in [vm.qmp_socket, *vm.extra_sockets])
        async with (
            QemuWatcher(vm.qmp_socket),
            QemuWatcher(vm.extra_sockets[0]),
            QemuWatcher(vm.extra_sockets[1]),
        ):
            # three clients hold three monitors; the lab still talks on its own
            await vm.execute("query-status")
        # stop() works while the code under test holds the main monitor
        async with QemuWatcher(vm.qmp_socket):
            assert await vm.stop(timeout=3) == 0


def test_sync_use_and_qmp_execute_once(chain4: Chain) -> None:
    with QemuVM([chain4]) as vm:
        status: Any = qmp_execute_once(vm.qmp_socket, "query-status", timeout=2)
        assert status["status"] == "running"
        with pytest.raises(ExecuteError):
            qmp_execute_once(vm.qmp_socket, "no-such-command")
        pid = vm.pid
    assert pid is not None and _gone(pid)
    assert not vm.socket_dir.exists()


async def test_qmp_execute_once_inside_a_running_loop(vm_factory: VMFactory, chain4: Chain) -> None:
    vm = vm_factory([chain4])
    status: Any = qmp_execute_once(vm.qmp_socket, "query-status")
    assert status["running"] is True


async def test_sigkill_leaves_the_socket_and_restart_works(chain4: Chain) -> None:
    async with QemuVM([chain4]) as vm:
        assert vm.alive
        assert vm.kill(signal.SIGKILL) == -signal.SIGKILL
        assert not vm.alive
        assert vm.qmp_socket.exists()  # QEMU had no chance to remove it
        await vm.restart()
        assert vm.alive
        await execute_once(vm.qmp_socket, "query-status")
        assert vm.kill(signal.SIGTERM) == 0
        assert not vm.qmp_socket.exists()  # a clean exit removes it


async def test_images_are_locked_while_qemu_runs(chain4: Chain) -> None:
    async with QemuVM([chain4]):
        with pytest.raises(ToolError, match="lock"):
            backing_chain(chain4.top)
        assert len(backing_chain(chain4.top, force_share=True)) == 4
    assert len(backing_chain(chain4.top)) == 4


async def test_cleanup_on_failure_leaves_no_process(chain4: Chain) -> None:
    pids = []
    with pytest.raises(RuntimeError):
        async with QemuVM([chain4]) as vm:
            pids.append(vm.pid)
            raise RuntimeError("test failed")
    assert not vm.alive
    assert pids[0] is not None and _gone(pids[0])


def test_vm_factory_stops_everything(vm_factory: VMFactory, chain4: Chain) -> None:
    vms = [vm_factory([chain4], kind="storage-daemon"), vm_factory(start=False)]
    assert vms[0].alive
    assert not vms[1].alive


async def test_a_real_stream_flattens_the_chain(chain4: Chain, short_tmp: Path) -> None:
    async with QemuVM([chain4], extra_monitors=1) as vm:
        async with QemuWatcher(vm.extra_sockets[0]) as watcher:
            await execute_once(
                vm.qmp_socket,
                "block-stream",
                {"job-id": "s1", "device": "disk0-fmt3", "auto-dismiss": False},
            )
            await watcher.wait_job_status("s1", "concluded")
            await vm.execute("job-dismiss", {"id": "s1"})
            await watcher.wait_job_status("s1", "null")
        statuses = [status for status, _ in watcher.job_statuses("s1")]
        assert statuses[:2] == ["created", "running"]
        assert statuses[-2:] == ["concluded", "null"]
        duration = watcher.job_duration("s1")
        assert duration is not None and 0 <= duration < 10
        # The job is dismissed: listing the nodes is safe again. Nodes made by -blockdev stay
        # (the monitor owns them until blockdev-del), but the top has no backing any more.
        nodes: Any = await vm.execute("query-named-block-nodes", {"flat": True})
        (top,) = [n for n in nodes if n["node-name"] == "disk0-fmt3"]
        assert top["backing_file_depth"] == 0
        assert "disk0-fmt0" in {n["node-name"] for n in nodes}
    assert backing_chain(chain4.top) == [str(chain4.top)]
    assert chain4.matches()


async def test_watcher_is_bounded_and_notices_a_dead_vm(chain4: Chain) -> None:
    vm = QemuVM([chain4], extra_monitors=1)
    async with vm, QemuWatcher(vm.extra_sockets[0], maxlen=3) as watcher:
        await vm.execute("block-stream", {"job-id": "s1", "device": "disk0-fmt3"})
        await watcher.wait_for("JOB_STATUS_CHANGE", lambda e: e.data["status"] == "null")
        assert len(watcher.events()) == 3
        assert watcher.dropped > 0
        assert watcher.last_seq == 3 + watcher.dropped
        with pytest.raises(TimeoutError):
            await watcher.wait_for("SHUTDOWN", timeout=0.1)
        vm.kill()
        with pytest.raises(LabError, match="disconnected"):
            await asyncio.wait_for(watcher.wait_for("SHUTDOWN", timeout=5), 3)


def test_no_qemu_is_left_behind() -> None:
    """Runs last in this file: every QEMU the tests above started has been reaped."""
    me = str(os.getpid())
    leftovers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = stat[stat.rindex(")") + 2 :].split()[1]
        if ppid == me and comm.startswith("qemu"):
            leftovers.append((entry.name, comm))
    assert leftovers == []
