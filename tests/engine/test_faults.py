"""I/O errors injected with blkdebug, and every way a connection can fail, against real QEMU."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from blockpull import stream
from blockpull.chain import read_chain
from blockpull.errors import QEMUUnavailable, QMPTimeout, VMNotFound
from blockpull.qmp import QMPConnection
from qemulab.images import Chain

from .conftest import assert_intact, start_vm, stop_vm

# A sector inside the data the bottom image holds (the default pattern writes its first 24 MiB).
SECTOR = 2048


@pytest.mark.parametrize("on_error", ["report", "ignore"])
async def test_read_error_reported_or_ignored(workdir: Path, chain4: Chain, on_error: str) -> None:
    errors = {0: [{"event": "read_aio", "errno": 5, "sector": SECTOR}]}
    machine = await start_vm(workdir, chain4, blkdebug=errors)
    try:
        async with await QMPConnection.open(machine.socket) as conn:
            await stream.start_stream(
                conn, stream.StreamRequest(disk=machine.top_node, job_id="e", on_error=on_error)
            )
            outcome = await asyncio.wait_for(stream.wait_for_outcome(conn, "e", poll_interval=0.2), 30)
            # report: fails at the error. ignore: runs to the end, then still COMPLETES WITH the
            # error and keeps the backing file (QEMU's documented behaviour).
            assert outcome.result is stream.Result.FAILED
            assert outcome.error == "Input/output error"
            if on_error == "ignore":
                assert outcome.offset == outcome.length
            await stream.dismiss(conn, "e")
            assert len((await read_chain(conn, machine.top_node)).images) == 4
            assert machine.alive
    finally:
        stop_vm(machine)
    assert_intact(chain4)


@pytest.mark.parametrize(
    ("on_error", "errno", "io_status"), [("stop", 5, "failed"), ("enospc", 28, "nospace")]
)
async def test_stop_and_enospc_pause_then_resume_retries(
    workdir: Path, chain4: Chain, on_error: str, errno: int, io_status: str
) -> None:
    errors = {0: [{"event": "read_aio", "errno": errno, "sector": SECTOR, "once": True}]}
    machine = await start_vm(workdir, chain4, blkdebug=errors)
    try:
        async with await QMPConnection.open(machine.socket) as conn:
            await stream.start_stream(
                conn, stream.StreamRequest(disk=machine.top_node, job_id="s", on_error=on_error)
            )
            for _ in range(100):
                job = await stream.progress(conn, "s")
                if job.paused:
                    break
                await asyncio.sleep(0.05)
            assert job.paused and job.io_status == io_status, job
            # The error was one-off: resuming retries the read and the pull completes.
            await stream.resume(conn, "s")
            outcome = await asyncio.wait_for(stream.wait_for_outcome(conn, "s", poll_interval=0.2), 30)
            assert outcome.ok
            await stream.flush_disk(conn, machine.top_node)
            await stream.dismiss(conn, "s")
    finally:
        stop_vm(machine)
    assert_intact(chain4)


async def test_enospc_mode_reports_other_errors(workdir: Path, chain4: Chain) -> None:
    errors = {0: [{"event": "read_aio", "errno": 5, "sector": SECTOR}]}
    machine = await start_vm(workdir, chain4, blkdebug=errors)
    try:
        async with await QMPConnection.open(machine.socket) as conn:
            await stream.start_stream(
                conn, stream.StreamRequest(disk=machine.top_node, job_id="n", on_error="enospc")
            )
            outcome = await asyncio.wait_for(stream.wait_for_outcome(conn, "n", poll_interval=0.2), 30)
            assert outcome.result is stream.Result.FAILED and outcome.error == "Input/output error"
            await stream.dismiss(conn, "n")
    finally:
        stop_vm(machine)
    assert_intact(chain4)


async def test_missing_socket(workdir: Path) -> None:
    with pytest.raises(VMNotFound, match="no QMP socket"):
        await QMPConnection.open(str(workdir / "absent.qmp"))


async def test_file_that_is_not_a_socket(workdir: Path) -> None:
    path = workdir / "plain.qmp"
    path.write_text("")
    with pytest.raises(QEMUUnavailable, match="not a unix socket"):
        await QMPConnection.open(str(path))


async def test_socket_nobody_answers_on(workdir: Path) -> None:
    path = str(workdir / "silent.qmp")
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


async def test_socket_with_no_listener(workdir: Path) -> None:
    path = str(workdir / "dead.qmp")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.close()  # the file stays, as after QEMU was SIGKILLed
    with pytest.raises(QEMUUnavailable, match="refused"):
        await QMPConnection.open(path, connect_timeout=0.5)


async def test_monitor_already_held_by_another_client(workdir: Path, chain4: Chain) -> None:
    machine = await start_vm(workdir, chain4)
    try:
        async with await QMPConnection.open(machine.socket):
            started = time.monotonic()
            with pytest.raises(QMPTimeout, match="another client"):
                await QMPConnection.open(machine.socket, connect_timeout=0.5)
            assert time.monotonic() - started < 2
        assert machine.alive
    finally:
        stop_vm(machine)


async def test_event_memory_is_bounded(workdir: Path, chain4: Chain) -> None:
    machine = await start_vm(workdir, chain4)
    try:
        async with await QMPConnection.open(machine.socket) as conn:
            sub = conn.subscribe(depth=8)
            for index in range(20):  # each job emits ~7 events
                await stream.start_stream(
                    conn, stream.StreamRequest(disk=machine.top_node, job_id=f"m{index}")
                )
                await asyncio.wait_for(stream.wait_for_outcome(conn, f"m{index}", poll_interval=0.1), 10)
                await stream.dismiss(conn, f"m{index}")
            assert sub.pending() <= 8 and sub.overflowed
            conn.unsubscribe(sub)
            assert conn._subscriptions == []
            # qemu.qmp's own default listener never saw an event (it would keep them forever).
            assert conn._client is not None and conn._client.events.empty()
            assert len(conn._client.events.history) == 0
    finally:
        stop_vm(machine)
