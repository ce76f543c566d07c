"""Steering and refusing libvirt block jobs: live bandwidth, cancel, a busy disk, a domain
that is not there yet, names libvirt refuses, what libvirt cannot do (pause, on-error, error
text), and a job that fails for real (ENOSPC on a tiny tmpfs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from virtsupport import SLOW, driver_for, follow_to_end, request, wait_for

from blockpull.driver import CANCELLED_ERROR, StreamRequest
from blockpull.errors import (
    BaseNotInChain,
    Disconnected,
    DiskBusy,
    DiskNotFound,
    JobNotFound,
    Unsupported,
    VMNotFound,
)
from blockpull.libvirt.connection import LibvirtConnection
from blockpull.libvirt.driver import LibvirtDriver
from blockpull.pull import cancel_and_confirm, outcome_of
from qemulab import Chain, backing_chain, check, compare
from qemulab.patterns import MiB
from qemulab.pytest_plugin import ChainFactory
from qemulab.tools import QEMU_IMG, run_tool
from virtlab import DomainDisk, LibvirtDaemon, assert_flattened, assert_intact, assert_untainted, virsh
from virtlab.pytest_plugin import DomainFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.asyncio(loop_scope="session")]


async def test_bandwidth_up_and_down(
    conn: LibvirtConnection, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = domain_factory(data_chain)
    driver = driver_for(conn, domain)
    started = await driver.start(request(bandwidth=SLOW))
    job = await driver.find_job(started.job_id)
    assert job is not None and job.status == "running" and job.speed == SLOW
    assert job.length == data_chain.size and job.job_type == "stream"
    # libvirt's own view agrees (bytes/s as given, not MiB/s).
    assert f"{SLOW}" in domain.block_job_info() or "2097152" in domain.block_job_info()
    await driver.set_speed(started.job_id, SLOW // 2)
    job = await driver.find_job(started.job_id)
    assert job is not None and job.speed == SLOW // 2
    await driver.set_speed(started.job_id, 0)  # unlimited: it finishes at once
    done = await follow_to_end(driver, started.job_id, timeout=30)
    assert done.error is None
    assert_flattened(domain, data_chain)


async def test_cancel_keeps_the_chain_intact(
    conn: LibvirtConnection, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = domain_factory(data_chain)
    driver = driver_for(conn, domain)
    started = await driver.start(request(bandwidth=SLOW))
    await wait_for(
        lambda: driver.find_job(started.job_id), what="the job running"
    )  # some data copied: cancel must keep it valid
    await asyncio.sleep(1.0)
    done = await cancel_and_confirm(driver, started.job_id, timeout=10)
    assert done is not None and done.concluded and done.error == CANCELLED_ERROR
    outcome = outcome_of(done)
    assert outcome is not None and outcome.result.value == "cancelled"
    assert 0 < outcome.offset < outcome.length
    assert _no_job(domain.block_job_info())
    assert_intact(domain, data_chain)
    domain.destroy()
    assert_intact(None, data_chain)


async def test_busy_disk_then_runs(
    conn: LibvirtConnection, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    """A job someone else started (virsh) holds the disk: DiskBusy naming it; then ours runs."""
    domain = domain_factory(data_chain)
    domain.virsh("blockpull", domain.name, "vda", "--bandwidth", "1")  # 1 MiB/s: stays a while
    driver = driver_for(conn, domain)
    with pytest.raises(DiskBusy, match="vda"):
        await driver.start(request())
    holders = await driver.blocking_jobs("vda")
    assert [j.job_id for j in holders] == [f"{domain.name}/vda"]
    assert "blockjob" in driver.collect_command(holders[0]) and "--abort" in driver.collect_command(
        holders[0]
    )
    domain.virsh("blockjob", domain.name, "vda", "--abort")
    await wait_for(
        lambda: domain.block_job_info().strip() in ("", "No current block job for vda"), what="abort"
    )
    started = await driver.start(request())
    done = await follow_to_end(driver, started.job_id)
    assert done.error is None
    assert_flattened(domain, data_chain)


async def test_domain_absent_then_runs(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain4: Chain
) -> None:
    domain = domain_factory.define(chain4)
    driver = driver_for(conn, domain)
    with pytest.raises(VMNotFound) as caught:
        await driver.start(request())
    assert caught.value.reason == "WaitingForVM"
    domain.create()
    started = await driver.start(request())
    done = await follow_to_end(driver, started.job_id)
    assert done.error is None
    assert_flattened(domain, chain4)


async def test_names_libvirt_refuses(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain4: Chain
) -> None:
    domain = domain_factory(chain4)
    driver = driver_for(conn, domain)
    with pytest.raises(DiskNotFound):
        await driver.start(request("vdz"))
    with pytest.raises(DiskNotFound, match="backing image"):
        await driver.start(request(str(chain4.images[1])))
    with pytest.raises(DiskNotFound):
        await driver.start(request("virtio-disk0"))  # the alias: libvirt does not take it
    with pytest.raises(BaseNotInChain):
        await driver.start(request(base="/nope.qcow2"))
    with pytest.raises(BaseNotInChain, match="active image"):
        await driver.start(request(base=str(chain4.top)))
    with pytest.raises(BaseNotInChain):
        await driver.start(request(base="vda[1]"))
    with pytest.raises(BaseNotInChain):
        await driver.start(request(base="vda[9]"))
    with pytest.raises(BaseNotInChain):
        await driver.start(request(base="mid1.qcow2"))
    with pytest.raises(Unsupported, match="on-error"):
        await driver.start(StreamRequest(disk="vda", job_id="x", on_error="stop"))
    with pytest.raises(JobNotFound):
        await driver.set_speed(f"{domain.name}/vda", 0)
    with pytest.raises(JobNotFound):
        await driver.cancel(f"{domain.name}/vda")
    assert await driver.find_job(f"{domain.name}/vda") is None
    assert await driver.find_job("never-started") is None
    assert await driver.list_jobs() == []
    assert _no_job(domain.block_job_info())
    assert_intact(domain, chain4)


async def test_pause_is_refused_and_the_job_keeps_running(
    conn: LibvirtConnection, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = domain_factory(data_chain)
    driver = driver_for(conn, domain)
    assert driver.can_pause is False
    started = await driver.start(request(bandwidth=SLOW))
    with pytest.raises(Unsupported, match="no block-job pause"):
        await driver.pause(started.job_id)
    job = await driver.find_job(started.job_id)
    assert job is not None and job.status == "running" and not job.paused
    await driver.resume(started.job_id)  # nothing to resume: not an error
    await driver.set_speed(started.job_id, 0)
    await follow_to_end(driver, started.job_id)
    assert_flattened(domain, data_chain)  # untainted: no monitor command was used


async def test_failed_job_reports_no_text_and_where_to_look(
    conn: LibvirtConnection,
    domain_factory: DomainFactory,
    chain_factory: ChainFactory,
    libvirtd_running: LibvirtDaemon,
    short_tmp: Path,
) -> None:
    """The top image on a 2 MiB tmpfs: pulling 24 MiB into it fails with ENOSPC."""
    chain = chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=24 * MiB)
    small = short_tmp / "small"
    host_view = libvirtd_running.mount_tmpfs(small, "2m")
    top_host = host_view / "top.qcow2"
    run_tool([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(chain.top), "-F", "qcow2", str(top_host)])
    domain = domain_factory(disks=[DomainDisk("vda", small / "top.qcow2")])
    driver = driver_for(conn, domain)
    started = await driver.start(request())
    done = await follow_to_end(driver, started.job_id)
    outcome = outcome_of(done)
    assert outcome is not None and outcome.result.value == "failed"
    assert outcome.error is not None and "no error text" in outcome.error
    assert "libvirtd" in outcome.error  # where to look instead
    # The chain is intact in libvirt's view and in the headers; the data is still all there.
    expected = [str(small / "top.qcow2"), *(str(p) for p in reversed(chain.images))]
    assert domain.xml_chain() == expected
    assert_untainted(domain)
    domain.destroy()
    assert backing_chain(top_host)[1:] == expected[1:]
    assert chain.reference is not None and compare(top_host, chain.reference)
    assert check(top_host).corruptions == 0


async def test_driver_of_a_stopped_domain(
    conn: LibvirtConnection, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    """The domain goes away mid-job: the watch says Disconnected, as when QEMU exits."""
    domain = domain_factory(data_chain)
    driver = driver_for(conn, domain)
    started = await driver.start(request(bandwidth=SLOW))
    async with driver.watch(started.job_id) as watch:
        virsh(domain.uri, "destroy", domain.name)
        with pytest.raises(Disconnected):
            for _ in range(20):
                await watch.changed(0.5)
    with pytest.raises(Disconnected):
        await driver.find_job(started.job_id)
    assert isinstance(driver, LibvirtDriver)


def _no_job(info: str) -> bool:
    """`virsh blockjob --info` says there is no job (older virsh prints nothing)."""
    return info.strip() == "" or "No current block job" in info
