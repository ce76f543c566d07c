"""The stream engine against a real QEMU 7.2 and real qcow2 chains (no guest needed)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from blockpull import pull as protocol
from blockpull import stream
from blockpull.chain import read_chain, read_graph
from blockpull.driver import Outcome, Result, StreamRequest
from blockpull.errors import BaseNotInChain, Disconnected, DiskBusy, DiskNotFound
from blockpull.qmp import QMPConnection
from qemulab import EIO, AttachMode, Chain, Disk, InjectError, QemuVM, backing_chain, backing_names
from qemulab.patterns import MiB
from qemulab.pytest_plugin import ChainFactory, VMFactory

from .conftest import assert_intact, settle, wait_exit

pytestmark = pytest.mark.qemu


async def pull(conn: QMPConnection, disk: str, **kwargs: object) -> Outcome:
    job_id = str(kwargs.pop("job_id", "bp-test"))
    started = await stream.start_stream(conn, stream.StreamRequest(disk=disk, job_id=job_id, **kwargs))  # type: ignore[arg-type]
    outcome = await asyncio.wait_for(settle(conn, job_id, poll_interval=0.2), 60)
    assert started.device
    assert await stream.find_job(conn, job_id) is None
    return outcome


async def test_full_pull_of_a_four_image_chain(vm: QemuVM, conn: QMPConnection, chain4: Chain) -> None:
    disk = vm.disks[0]
    chain = await read_chain(conn, disk.top)
    assert [image.node_name for image in chain.images] == list(reversed(disk.format_nodes))
    assert [image.filename for image in chain.images] == [str(p) for p in reversed(chain4.images)]
    outcome = await pull(conn, disk.top)
    assert outcome.ok and outcome.offset == outcome.length == 64 * MiB
    assert len((await read_chain(conn, disk.top)).images) == 1
    await vm.stop()
    assert backing_names(chain4.top) == []
    assert_intact(chain4)


@pytest.mark.parametrize("base_form", ["node", "path"])
async def test_pull_to_a_base_keeps_the_relative_name(
    vm: QemuVM, conn: QMPConnection, chain4: Chain, base_form: str
) -> None:
    nodes = vm.disks[0].format_nodes
    base = nodes[1] if base_form == "node" else str(chain4.images[1])
    outcome = await pull(conn, vm.disks[0].top, base=base)
    assert outcome.ok
    chain = await read_chain(conn, vm.disks[0].top)
    assert [image.node_name for image in chain.images] == [nodes[3], nodes[1], nodes[0]]
    await vm.stop()
    # Recorded exactly as the image above the base recorded it: relative stays relative.
    assert backing_names(chain4.top)[0] == chain4.images[1].name
    assert_intact(chain4)


async def test_disk_without_backing_file_completes_at_once(
    chain_factory: ChainFactory, vm_factory: VMFactory
) -> None:
    machine = vm_factory([chain_factory(layers=1, size=16 * MiB)])
    async with await QMPConnection.open(str(machine.qmp_socket)) as conn:
        outcome = await pull(conn, machine.disks[0].top)
        assert outcome.ok and outcome.length == 0


async def test_disk_by_active_image_path(vm: QemuVM, conn: QMPConnection, chain4: Chain) -> None:
    chain = await read_chain(conn, str(chain4.top))
    assert chain.device == vm.disks[0].top
    with pytest.raises(DiskNotFound, match="is a backing image"):
        await read_chain(conn, str(chain4.images[1]))
    assert (await pull(conn, str(chain4.top))).ok


@pytest.mark.parametrize(
    ("attach", "disk_id"), [("drive", "drive_id"), ("device", "device_id"), ("device", "drive_id")]
)
async def test_disk_by_drive_id_and_guest_device(
    vm_factory: VMFactory, chain4: Chain, attach: AttachMode, disk_id: str
) -> None:
    machine = vm_factory([Disk(chain4, attach=attach)])
    disk = getattr(machine.disks[0], disk_id)  # drive0 or vda
    async with await QMPConnection.open(str(machine.qmp_socket)) as conn:
        chain = await read_chain(conn, disk)
        # -drive opens the backing chain from the image headers: auto node names.
        assert chain.images[0].filename == str(chain4.top)
        assert len(chain.images) == 4
        base_node = chain.images[2].node_name
        outcome = await pull(conn, disk, base=base_node)
        assert outcome.ok
        assert len((await read_chain(conn, disk)).images) == 3
        assert machine.alive
    await machine.stop()
    assert backing_names(chain4.top)[0] == chain4.images[1].name
    assert_intact(chain4)


async def test_unknown_disk_and_base_not_in_chain(vm: QemuVM, conn: QMPConnection) -> None:
    top = vm.disks[0].top
    with pytest.raises(DiskNotFound, match="no disk 'nope'"):
        await stream.start_stream(conn, stream.StreamRequest(disk="nope", job_id="j1"))
    with pytest.raises(BaseNotInChain, match="not in the backing chain"):
        await stream.start_stream(
            conn, stream.StreamRequest(disk=top, job_id="j1", base="/images/other.qcow2")
        )
    with pytest.raises(BaseNotInChain, match=r"the disk .* itself"):
        await stream.start_stream(conn, stream.StreamRequest(disk=top, job_id="j1", base=top))
    assert await stream.list_jobs(conn) == []
    assert vm.alive


async def test_second_pull_on_a_busy_chain_is_refused(vm: QemuVM, conn: QMPConnection, chain4: Chain) -> None:
    top, nodes = vm.disks[0].top, vm.disks[0].format_nodes
    await stream.start_stream(conn, stream.StreamRequest(disk=top, job_id="first", bandwidth=1 * MiB))
    for disk in (top, nodes[2]):
        with pytest.raises(DiskBusy, match="busy"):
            await stream.start_stream(conn, stream.StreamRequest(disk=disk, job_id="second"))
    with pytest.raises(DiskBusy, match=r"busy|already exists"):
        await stream.start_stream(conn, stream.StreamRequest(disk=nodes[1], job_id="first"))
    await stream.set_bandwidth(conn, "first", 0)
    outcome = await asyncio.wait_for(settle(conn, "first"), 30)
    assert outcome.ok
    await stream.dismiss(conn, "first")
    await vm.stop()
    assert_intact(chain4)


async def test_live_bandwidth_change_pause_and_resume(vm: QemuVM, conn: QMPConnection, chain4: Chain) -> None:
    await stream.start_stream(
        conn, stream.StreamRequest(disk=vm.disks[0].top, job_id="bw", bandwidth=1 * MiB)
    )
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
    outcome = await asyncio.wait_for(settle(conn, "bw"), 30)
    assert outcome.ok
    await stream.dismiss(conn, "bw")
    await vm.stop()
    assert_intact(chain4)


@pytest.mark.parametrize("paused", [False, True])
async def test_cancel_keeps_the_chain_and_a_later_pull_resumes(
    vm: QemuVM, conn: QMPConnection, chain4: Chain, paused: bool
) -> None:
    top = vm.disks[0].top
    await stream.start_stream(conn, stream.StreamRequest(disk=top, job_id="c1", bandwidth=4 * MiB))
    await asyncio.sleep(0.8)
    if paused:
        await stream.pause(conn, "c1")
        await asyncio.sleep(0.2)
    await stream.cancel(conn, "c1")
    outcome = await asyncio.wait_for(settle(conn, "c1"), 10)
    assert outcome.result is Result.CANCELLED
    assert 0 < outcome.offset < outcome.length
    await stream.dismiss(conn, "c1")
    assert len((await read_chain(conn, top)).images) == 4  # chain intact
    assert chain4.matches(force_share=True)
    # A new pull starts from the data already copied: it only has the rest to copy.
    second = await pull(conn, top, job_id="c2")
    assert second.ok
    await vm.stop()
    assert_intact(chain4)
    assert backing_names(chain4.top) == []


async def test_cancel_racing_completion_reports_what_happened(vm: QemuVM, conn: QMPConnection) -> None:
    await stream.start_stream(conn, stream.StreamRequest(disk=vm.disks[0].top, job_id="race"))
    await stream.cancel(conn, "race")  # may arrive before or after the (fast) job finished
    outcome = await asyncio.wait_for(settle(conn, "race"), 10)
    assert outcome.result in (Result.COMPLETED, Result.CANCELLED)
    chain = await read_chain(conn, vm.disks[0].top)
    assert (len(chain.images) == 1) == (outcome.result is Result.COMPLETED)
    await stream.dismiss(conn, "race")


async def test_reattach_from_a_new_connection(vm: QemuVM, chain4: Chain) -> None:
    first = await QMPConnection.open(str(vm.qmp_socket))
    await stream.start_stream(
        first, stream.StreamRequest(disk=vm.disks[0].top, job_id="re", bandwidth=8 * MiB)
    )
    await first.close()  # the job outlives its client
    second = await QMPConnection.open(str(vm.qmp_socket))
    try:
        job = await stream.progress(second, "re")
        assert not job.concluded
        await stream.set_bandwidth(second, "re", 0)
        outcome = await asyncio.wait_for(settle(second, "re"), 30)
        assert outcome.ok
        await stream.dismiss(second, "re")
    finally:
        await second.close()
    await vm.stop()
    assert_intact(chain4)


@pytest.mark.parametrize("result", ["completed", "failed"])
async def test_job_that_ended_while_nobody_listened(
    vm_factory: VMFactory, chain4: Chain, result: str
) -> None:
    errors = {1: [InjectError(event="read_aio", errno=EIO)]} if result == "failed" else {}
    machine = vm_factory([Disk(chain4, inject=errors)])
    top = machine.disks[0].top
    conn = await QMPConnection.open(str(machine.qmp_socket))
    await stream.start_stream(conn, stream.StreamRequest(disk=top, job_id="away"))
    await conn.close()
    await asyncio.sleep(1.0)  # it ends while no client is connected; events are lost
    conn = await QMPConnection.open(str(machine.qmp_socket))
    job = await stream.progress(conn, "away")
    if result == "completed":
        # Held at `pending`: copied, the chain unchanged until someone concludes it.
        assert job.pending and protocol.outcome_of(job) is None
        assert len((await read_chain(conn, top)).images) == 4
        assert_intact(chain4)
    outcome = await settle(conn, "away")
    assert outcome.result.value == result
    if result == "failed":
        assert outcome.error == "Input/output error"
    assert await stream.find_job(conn, "away") is None
    # Once dismissed, QEMU no longer knows the job: the chain tells what happened.
    assert await stream.pulled(conn, top, None) == (result == "completed")
    await conn.close()
    assert machine.alive
    await machine.stop()
    assert_intact(chain4)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
async def test_qemu_killed_mid_pull(vm: QemuVM, conn: QMPConnection, chain4: Chain, sig: int) -> None:
    await stream.start_stream(conn, stream.StreamRequest(disk=vm.disks[0].top, job_id="k", bandwidth=4 * MiB))
    waiter = asyncio.create_task(settle(conn, "k", poll_interval=5))
    await asyncio.sleep(0.5)
    vm.kill(sig, wait=False)  # the clock below starts at the signal, not at QEMU's exit
    loop = asyncio.get_running_loop()
    started = loop.time()
    if sig == signal.SIGTERM:
        # SIGTERM: QEMU cancels the job (BLOCK_JOB_CANCELLED) before it exits; either the
        # cancel is seen or the connection's end, never a hang.
        try:
            outcome = await asyncio.wait_for(waiter, 5)
            assert outcome.result is Result.CANCELLED
        except Disconnected:
            pass
    else:
        with pytest.raises(Disconnected):
            await asyncio.wait_for(waiter, 5)
    assert loop.time() - started < 2, "the caller must learn promptly"
    await wait_exit(vm)
    assert_intact(chain4)
    assert conn.closed


async def test_completed_pull_is_durable_even_if_qemu_is_killed_after(
    vm: QemuVM, conn: QMPConnection, chain4: Chain
) -> None:
    # Without the flush, QEMU 7.2 loses the copied data's metadata on SIGKILL after completion
    # while the header already says "no backing file": the guest would read zeros.
    assert (await pull(conn, vm.disks[0].top)).ok
    vm.kill(signal.SIGKILL)  # waits (10 s at most) until QEMU is gone
    assert backing_names(chain4.top) == []
    assert_intact(chain4)


async def test_a_job_held_at_pending_leaves_the_chain_intact_and_node_listing_safe(
    vm: QemuVM, conn: QMPConnection, chain4: Chain
) -> None:
    """Measured on QEMU 7.2: `query-named-block-nodes` with a stream job at `pending` (auto-
    finalize off) does not crash QEMU; the chain changes only at `job-finalize`."""
    top = vm.disks[0].top
    await stream.start_stream(conn, StreamRequest(disk=top, job_id="held"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not (job := await stream.progress(conn, "held")).pending:
        assert loop.time() < deadline, job
        await asyncio.sleep(0.05)
    async with conn.graph_lock:
        graph = await read_graph(conn)
    assert graph.complete, "the full node listing was sent"
    assert vm.alive
    assert len((await read_chain(conn, top)).images) == 4, "chain unchanged while pending"
    assert backing_chain(chain4.top, force_share=True) == [str(p) for p in reversed(chain4.images)]
    outcome = await settle(conn, "held")
    assert outcome.ok and len((await read_chain(conn, top)).images) == 1
    assert vm.alive
