"""I/O errors injected with blkdebug, and every way a connection can fail, against real QEMU."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from blockpull import stream
from blockpull.chain import read_chain
from blockpull.driver import Result
from blockpull.errors import QEMUUnavailable, QMPTimeout, VMNotFound
from blockpull.qmp import QMPConnection
from qemulab import EIO, ENOSPC, Chain, Disk, InjectError, QemuVM
from qemulab.pytest_plugin import VMFactory

from .conftest import assert_intact, settle

pytestmark = pytest.mark.qemu

# A sector of the bottom image's file (blkdebug counts in the layer's file) inside the data it
# holds: 1 MiB in, among the clusters of the first 24 MiB the default pattern writes there.
SECTOR = 2048


@pytest.mark.parametrize("on_error", ["report", "ignore"])
async def test_read_error_reported_or_ignored(vm_factory: VMFactory, chain4: Chain, on_error: str) -> None:
    machine = vm_factory(
        [Disk(chain4, inject={0: [InjectError(event="read_aio", errno=EIO, sector=SECTOR)]})]
    )
    top = machine.disks[0].top
    async with await QMPConnection.open(str(machine.qmp_socket)) as conn:
        await stream.start_stream(conn, stream.StreamRequest(disk=top, job_id="e", on_error=on_error))
        outcome = await asyncio.wait_for(settle(conn, "e", poll_interval=0.2), 30)
        # report: fails at the error. ignore: runs to the end, then still COMPLETES WITH the
        # error and keeps the backing file (QEMU's documented behaviour).
        assert outcome.result is Result.FAILED
        assert outcome.error == "Input/output error"
        if on_error == "ignore":
            assert outcome.offset == outcome.length
        await stream.dismiss(conn, "e")
        assert len((await read_chain(conn, top)).images) == 4
        assert machine.alive
    await machine.stop()
    assert_intact(chain4)


@pytest.mark.parametrize(
    ("on_error", "errno", "io_status"), [("stop", EIO, "failed"), ("enospc", ENOSPC, "nospace")]
)
async def test_stop_and_enospc_pause_then_resume_retries(
    vm_factory: VMFactory, chain4: Chain, on_error: str, errno: int, io_status: str
) -> None:
    error = InjectError(event="read_aio", errno=errno, sector=SECTOR, once=True)
    machine = vm_factory([Disk(chain4, inject={0: [error]})])
    top = machine.disks[0].top
    async with await QMPConnection.open(str(machine.qmp_socket)) as conn:
        await stream.start_stream(conn, stream.StreamRequest(disk=top, job_id="s", on_error=on_error))
        for _ in range(100):
            job = await stream.progress(conn, "s")
            if job.paused:
                break
            await asyncio.sleep(0.05)
        assert job.paused and job.io_status == io_status, job
        # The error was one-off: resuming retries the read and the pull completes.
        await stream.resume(conn, "s")
        outcome = await asyncio.wait_for(settle(conn, "s", poll_interval=0.2), 30)
        assert outcome.ok
        await stream.flush_disk(conn, top)
        await stream.dismiss(conn, "s")
    await machine.stop()
    assert_intact(chain4)


async def test_enospc_mode_reports_other_errors(vm_factory: VMFactory, chain4: Chain) -> None:
    machine = vm_factory(
        [Disk(chain4, inject={0: [InjectError(event="read_aio", errno=EIO, sector=SECTOR)]})]
    )
    async with await QMPConnection.open(str(machine.qmp_socket)) as conn:
        await stream.start_stream(
            conn, stream.StreamRequest(disk=machine.disks[0].top, job_id="n", on_error="enospc")
        )
        outcome = await asyncio.wait_for(settle(conn, "n", poll_interval=0.2), 30)
        assert outcome.result is Result.FAILED and outcome.error == "Input/output error"
        await stream.dismiss(conn, "n")
    await machine.stop()
    assert_intact(chain4)


async def test_missing_socket(short_tmp: Path) -> None:
    with pytest.raises(VMNotFound, match="no QMP socket"):
        await QMPConnection.open(str(short_tmp / "absent.qmp"))


async def test_file_that_is_not_a_socket(short_tmp: Path) -> None:
    path = short_tmp / "plain.qmp"
    path.write_text("")
    with pytest.raises(QEMUUnavailable, match="not a unix socket"):
        await QMPConnection.open(str(path))


async def test_socket_nobody_answers_on(short_tmp: Path) -> None:
    path = str(short_tmp / "silent.qmp")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)  # accepts, never greets
    try:
        started = time.monotonic()
        with pytest.raises(QMPTimeout, match="did not greet"):
            await QMPConnection.open(path, connect_timeout=0.5)
        assert time.monotonic() - started < 2
    finally:
        server.close()


async def test_socket_with_no_listener(short_tmp: Path) -> None:
    path = str(short_tmp / "dead.qmp")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.close()  # the file stays, as after QEMU was SIGKILLed
    with pytest.raises(QEMUUnavailable, match="refused"):
        await QMPConnection.open(path, connect_timeout=0.5)


async def test_monitor_already_held_by_another_client(vm: QemuVM) -> None:
    socket_path = str(vm.qmp_socket)
    async with await QMPConnection.open(socket_path):
        started = time.monotonic()
        with pytest.raises(QMPTimeout, match="another client"):
            await QMPConnection.open(socket_path, connect_timeout=0.5)
        assert time.monotonic() - started < 2
    assert vm.alive


async def test_event_memory_is_bounded(vm: QemuVM) -> None:
    async with await QMPConnection.open(str(vm.qmp_socket)) as conn:
        sub = conn.subscribe(depth=8)
        for index in range(20):  # each job emits ~7 events
            await stream.start_stream(conn, stream.StreamRequest(disk=vm.disks[0].top, job_id=f"m{index}"))
            await asyncio.wait_for(settle(conn, f"m{index}", poll_interval=0.1), 10)
            await stream.dismiss(conn, f"m{index}")
        assert sub.pending() <= 8 and sub.overflowed
        conn.unsubscribe(sub)
        assert conn._subscriptions == []
        # qemu.qmp's own default listener never saw an event (it would keep them forever).
        assert conn._client is not None and conn._client.events.empty()
        assert len(conn._client.events.history) == 0
