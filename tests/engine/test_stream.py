"""The stream engine against a real QEMU 7.2 and real qcow2 chains (no guest needed)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from blockpull import stream
from blockpull.chain import read_chain
from blockpull.errors import BaseNotInChain, Disconnected, DiskBusy, DiskNotFound
from blockpull.qmp import QMPConnection
from qemulab.images import Chain, make_chain

from .conftest import VM, assert_intact, backing_of, start_vm, stop_vm

MiB = 1 << 20


async def pull(conn: QMPConnection, disk: str, **kwargs: object) -> stream.Outcome:
    job_id = str(kwargs.pop("job_id", "bp-test"))
    started = await stream.start_stream(conn, stream.StreamRequest(disk=disk, job_id=job_id, **kwargs))  # type: ignore[arg-type]
    outcome = await asyncio.wait_for(stream.wait_for_outcome(conn, job_id, poll_interval=0.2), 60)
    if outcome.ok and started.chain is not None:
        await stream.flush_disk(conn, started.chain.device)
    await stream.dismiss(conn, job_id)
    assert await stream.find_job(conn, job_id) is None
    return outcome


async def test_full_pull_of_a_four_image_chain(vm: VM, conn: QMPConnection, chain4: Chain) -> None:
    chain = await read_chain(conn, vm.top_node)
    assert [image.node_name for image in chain.images] == list(reversed(vm.node_names))
    assert [image.filename for image in chain.images] == [str(p) for p in reversed(chain4.images)]
    outcome = await pull(conn, vm.top_node)
    assert outcome.ok and outcome.offset == outcome.length == 64 * MiB
    assert len((await read_chain(conn, vm.top_node)).images) == 1
    stop_vm(vm)
    assert backing_of(chain4.top) is None
    assert_intact(chain4)


@pytest.mark.parametrize("base_form", ["node", "path"])
async def test_pull_to_a_base_keeps_the_relative_name(
    vm: VM, conn: QMPConnection, chain4: Chain, base_form: str
) -> None:
    base = vm.node_names[1] if base_form == "node" else str(chain4.images[1])
    outcome = await pull(conn, vm.top_node, base=base)
    assert outcome.ok
    chain = await read_chain(conn, vm.top_node)
    assert [image.node_name for image in chain.images] == [
        vm.node_names[3],
        vm.node_names[1],
        vm.node_names[0],
    ]
    stop_vm(vm)
    # Recorded exactly as the image above the base recorded it: relative stays relative.
    assert backing_of(chain4.top) == chain4.images[1].name
    assert_intact(chain4)


async def test_disk_without_backing_file_completes_at_once(workdir: Path) -> None:
    single = make_chain(workdir / "one", layers=1, size=16 * MiB)
    machine = await start_vm(workdir, single)
    try:
        async with await QMPConnection.open(machine.socket) as conn:
            outcome = await pull(conn, machine.top_node)
            assert outcome.ok and outcome.length == 0
    finally:
        stop_vm(machine)


async def test_disk_by_active_image_path(vm: VM, conn: QMPConnection, chain4: Chain) -> None:
    chain = await read_chain(conn, str(chain4.top))
    assert chain.device == vm.top_node
    with pytest.raises(DiskNotFound, match="is a backing image"):
        await read_chain(conn, str(chain4.images[1]))
    assert (await pull(conn, str(chain4.top))).ok


@pytest.mark.parametrize(("mode", "disk"), [("drive", "drive0"), ("device", "vda"), ("device", "drive0")])
async def test_disk_by_drive_id_and_guest_device(workdir: Path, chain4: Chain, mode: str, disk: str) -> None:
    machine = await start_vm(workdir, chain4, mode=mode)
    try:
        async with await QMPConnection.open(machine.socket) as conn:
            chain = await read_chain(conn, disk)
            # -drive opens the backing chain from the image headers: auto node names.
            assert chain.images[0].filename == str(chain4.top)
            assert len(chain.images) == 4
            base_node = chain.images[2].node_name
            outcome = await pull(conn, disk, base=base_node)
            assert outcome.ok
            assert len((await read_chain(conn, disk)).images) == 3
            assert machine.alive
    finally:
        stop_vm(machine)
    assert backing_of(chain4.top) == chain4.images[1].name
    assert_intact(chain4)


async def test_unknown_disk_and_base_not_in_chain(vm: VM, conn: QMPConnection, workdir: Path) -> None:
    with pytest.raises(DiskNotFound, match="no disk 'nope'"):
        await stream.start_stream(conn, stream.StreamRequest(disk="nope", job_id="j1"))
    with pytest.raises(BaseNotInChain, match="not in the backing chain"):
        await stream.start_stream(
            conn, stream.StreamRequest(disk=vm.top_node, job_id="j1", base="/images/other.qcow2")
        )
    with pytest.raises(BaseNotInChain, match=r"the disk .* itself"):
        await stream.start_stream(conn, stream.StreamRequest(disk=vm.top_node, job_id="j1", base=vm.top_node))
    assert await stream.list_jobs(conn) == []
    assert vm.alive


async def test_second_pull_on_a_busy_chain_is_refused(vm: VM, conn: QMPConnection, chain4: Chain) -> None:
    await stream.start_stream(conn, stream.StreamRequest(disk=vm.top_node, job_id="first", bandwidth=1 * MiB))
    for disk in (vm.top_node, vm.node_names[2]):
        with pytest.raises(DiskBusy, match="busy"):
            await stream.start_stream(conn, stream.StreamRequest(disk=disk, job_id="second"))
    with pytest.raises(DiskBusy, match=r"busy|already exists"):
        await stream.start_stream(conn, stream.StreamRequest(disk=vm.node_names[1], job_id="first"))
    await stream.set_bandwidth(conn, "first", 0)
    outcome = await asyncio.wait_for(stream.wait_for_outcome(conn, "first"), 30)
    assert outcome.ok
    await stream.dismiss(conn, "first")
    stop_vm(vm)
    assert_intact(chain4)


async def test_live_bandwidth_change_pause_and_resume(vm: VM, conn: QMPConnection, chain4: Chain) -> None:
    await stream.start_stream(conn, stream.StreamRequest(disk=vm.top_node, job_id="bw", bandwidth=1 * MiB))
    await asyncio.sleep(0.3)
    first = await stream.progress(conn, "bw")
    await asyncio.sleep(1.0)
    slow = await stream.progress(conn, "bw")
    assert slow.speed == 1 * MiB
    slow_rate = (slow.offset - first.offset) / 1.0
    await stream.set_bandwidth(conn, "bw", 4 * MiB)
    await asyncio.sleep(0.3)
    before = await stream.progress(conn, "bw")
    await asyncio.sleep(1.0)
    fast = await stream.progress(conn, "bw")
    assert fast.speed == 4 * MiB
    fast_rate = (fast.offset - before.offset) / 1.0
    # offset also moves over unallocated holes, so compare generously: clearly faster.
    assert fast_rate > 1.5 * slow_rate, (slow_rate, fast_rate)

    await stream.pause(conn, "bw")
    await asyncio.sleep(0.3)
    paused = await stream.progress(conn, "bw")
    await asyncio.sleep(0.7)
    still = await stream.progress(conn, "bw")
    assert paused.paused and still.paused
    assert still.offset == paused.offset, "a paused job must not move"
    await stream.pause(conn, "bw")  # idempotent
    await stream.resume(conn, "bw")
    await stream.resume(conn, "bw")  # idempotent
    await stream.set_bandwidth(conn, "bw", 0)
    outcome = await asyncio.wait_for(stream.wait_for_outcome(conn, "bw"), 30)
    assert outcome.ok
    await stream.dismiss(conn, "bw")
    stop_vm(vm)
    assert_intact(chain4)


@pytest.mark.parametrize("paused", [False, True])
async def test_cancel_keeps_the_chain_and_a_later_pull_resumes(
    vm: VM, conn: QMPConnection, chain4: Chain, paused: bool
) -> None:
    await stream.start_stream(conn, stream.StreamRequest(disk=vm.top_node, job_id="c1", bandwidth=4 * MiB))
    await asyncio.sleep(0.8)
    if paused:
        await stream.pause(conn, "c1")
        await asyncio.sleep(0.2)
    await stream.cancel(conn, "c1")
    outcome = await asyncio.wait_for(stream.wait_for_outcome(conn, "c1"), 10)
    assert outcome.result is stream.Result.CANCELLED
    assert 0 < outcome.offset < outcome.length
    await stream.dismiss(conn, "c1")
    assert len((await read_chain(conn, vm.top_node)).images) == 4  # chain intact
    assert chain4.matches(force_share=True)
    # A new pull starts from the data already copied: it only has the rest to copy.
    second = await pull(conn, vm.top_node, job_id="c2")
    assert second.ok
    stop_vm(vm)
    assert_intact(chain4)
    assert backing_of(chain4.top) is None


async def test_cancel_racing_completion_reports_what_happened(vm: VM, conn: QMPConnection) -> None:
    await stream.start_stream(conn, stream.StreamRequest(disk=vm.top_node, job_id="race"))
    await stream.cancel(conn, "race")  # may arrive before or after the (fast) job finished
    outcome = await asyncio.wait_for(stream.wait_for_outcome(conn, "race"), 10)
    assert outcome.result in (stream.Result.COMPLETED, stream.Result.CANCELLED)
    chain = await read_chain(conn, vm.top_node)
    assert (len(chain.images) == 1) == (outcome.result is stream.Result.COMPLETED)
    await stream.dismiss(conn, "race")


async def test_reattach_from_a_new_connection(vm: VM, chain4: Chain) -> None:
    first = await QMPConnection.open(vm.socket)
    await stream.start_stream(first, stream.StreamRequest(disk=vm.top_node, job_id="re", bandwidth=8 * MiB))
    await first.close()  # the job outlives its client
    second = await QMPConnection.open(vm.socket)
    try:
        job = await stream.progress(second, "re")
        assert not job.concluded
        await stream.set_bandwidth(second, "re", 0)
        outcome = await asyncio.wait_for(stream.wait_for_outcome(second, "re"), 30)
        assert outcome.ok
        await stream.dismiss(second, "re")
    finally:
        await second.close()
    stop_vm(vm)
    assert_intact(chain4)


@pytest.mark.parametrize("result", ["completed", "failed"])
async def test_job_that_ended_while_nobody_listened(workdir: Path, chain4: Chain, result: str) -> None:
    errors = {1: [{"event": "read_aio", "errno": 5}]} if result == "failed" else None
    machine = await start_vm(workdir, chain4, blkdebug=errors)
    try:
        conn = await QMPConnection.open(machine.socket)
        await stream.start_stream(conn, stream.StreamRequest(disk=machine.top_node, job_id="away"))
        await conn.close()
        await asyncio.sleep(1.0)  # it ends while no client is connected; events are lost
        conn = await QMPConnection.open(machine.socket)
        job = await stream.progress(conn, "away")
        outcome = stream.outcome_of(job)
        assert outcome is not None and outcome.result.value == result
        if result == "failed":
            assert outcome.error == "Input/output error"
        await stream.dismiss(conn, "away")
        assert await stream.find_job(conn, "away") is None
        # Once dismissed, QEMU no longer knows the job: the chain tells what happened.
        verdict = await stream.judge_from_chain(conn, machine.top_node, None)
        assert (verdict is stream.Result.COMPLETED) == (result == "completed")
        await conn.close()
        assert machine.alive
    finally:
        stop_vm(machine)
    assert_intact(chain4)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_qemu_killed_mid_pull(vm: VM, conn: QMPConnection, chain4: Chain, sig: int) -> None:
    await stream.start_stream(conn, stream.StreamRequest(disk=vm.top_node, job_id="k", bandwidth=4 * MiB))
    waiter = asyncio.create_task(stream.wait_for_outcome(conn, "k", poll_interval=5))
    await asyncio.sleep(0.5)
    vm.kill(sig)
    loop = asyncio.get_running_loop()
    started = loop.time()
    if sig == signal.SIGTERM:
        # SIGTERM: QEMU cancels the job (BLOCK_JOB_CANCELLED) before it exits; either the
        # cancel is seen or the connection's end, never a hang.
        try:
            outcome = await asyncio.wait_for(waiter, 5)
            assert outcome.result is stream.Result.CANCELLED
        except Disconnected:
            pass
    else:
        with pytest.raises(Disconnected):
            await asyncio.wait_for(waiter, 5)
    assert loop.time() - started < 2, "the caller must learn promptly"
    vm.proc.wait(10)
    assert_intact(chain4)
    assert conn.closed


async def test_completed_pull_is_durable_even_if_qemu_is_killed_after(
    vm: VM, conn: QMPConnection, chain4: Chain
) -> None:
    # Without the flush, QEMU 7.2 loses the copied data's metadata on SIGKILL after completion
    # while the header already says "no backing file": the guest would read zeros.
    assert (await pull(conn, vm.top_node)).ok
    vm.kill(signal.SIGKILL)
    vm.proc.wait(10)
    assert backing_of(chain4.top) is None
    assert_intact(chain4)
