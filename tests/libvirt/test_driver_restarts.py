"""Restart safety: libvirtd restarted or hung mid-job, the client killed mid-job, a job that
ended while nobody listened. libvirt forgets a job the moment it ends; these tests show what
the driver still knows and how the chain in libvirt's XML decides the rest."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest
from virtsupport import SLOW, driver_for, follow_to_end, request, wait_for

from blockpull.errors import HypervisorUnavailable
from blockpull.libvirt.connection import LibvirtConnection
from blockpull.libvirt.driver import LibvirtDriver
from qemulab import Chain
from virtlab import LibvirtDaemon, assert_flattened
from virtlab.pytest_plugin import DomainFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.asyncio(loop_scope="session")]

#: A client in a process of its own: starts a pull with the given job id, says so, then
#: sleeps until killed (the agent SIGKILLed mid-job).
_CLIENT = """
import asyncio, sys
from blockpull.driver import StreamRequest
from blockpull.libvirt.connection import LibvirtConnection
from blockpull.libvirt.driver import LibvirtDriver

async def main(uri, domain, job_id, bandwidth):
    conn = await LibvirtConnection(uri).open()
    driver = LibvirtDriver(conn, domain)
    await driver.start(StreamRequest(disk="vda", job_id=job_id, bandwidth=int(bandwidth)))
    print("started", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


def _start_in_other_process(uri: str, domain: str, job_id: str, bandwidth: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, uri, domain, job_id, str(bandwidth)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "started":
        proc.kill()
        raise AssertionError(f"the client did not start the job: {line} {proc.communicate()[1]}")
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)


async def test_libvirtd_restarted_mid_job(
    conn: LibvirtConnection, libvirtd_running: LibvirtDaemon, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = domain_factory(data_chain)
    driver = driver_for(conn, domain)
    started = await driver.start(request(bandwidth=SLOW))
    connects = conn.connects
    async with driver.watch(started.job_id) as watch:
        libvirtd_running.terminate()  # SIGTERM: the job and QEMU go on
        await wait_for(lambda: not conn.connected, what="the close callback")
        with pytest.raises(HypervisorUnavailable) as caught:
            await driver.find_job(started.job_id)
        assert caught.value.reason == "LibvirtUnavailable" and libvirtd_running.uri in caught.value.message
        libvirtd_running.start_libvirtd()
        await wait_for(lambda: conn.connected, what="the reconnect", timeout=30)
        assert conn.connects == connects + 1
        assert await watch.changed(5.0)  # a reconnect wakes whoever follows a job
    job = await driver.find_job(started.job_id)  # re-attached: still running
    assert job is not None and job.status == "running" and job.speed == SLOW
    await driver.set_speed(started.job_id, 0)
    done = await follow_to_end(driver, started.job_id)  # the outcome from the new connection's event
    assert done.error is None
    assert_flattened(domain, data_chain)


async def test_job_ended_while_libvirtd_was_down(
    conn: LibvirtConnection, libvirtd_running: LibvirtDaemon, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = domain_factory(data_chain)
    driver = driver_for(conn, domain)
    started = await driver.start(request(bandwidth=SLOW * 4))  # ~3 s
    libvirtd_running.terminate()
    await asyncio.sleep(6.0)  # the job completes while libvirtd is down
    libvirtd_running.start_libvirtd()
    await wait_for(lambda: conn.connected, what="the reconnect", timeout=30)
    # libvirtd finalised it at start-up; no event reaches anyone: the job is simply gone ...
    assert await driver.find_job(started.job_id) is None
    # ... and libvirt's XML, matching the images' headers, says the pull is done.
    assert await driver.pulled("vda", None)
    assert_flattened(domain, data_chain)


async def test_client_killed_mid_job_reattaches_to_the_one_job(
    conn: LibvirtConnection, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = domain_factory(data_chain)
    proc = _start_in_other_process(domain.uri, domain.name, "blockpull-0a1b2c", SLOW)
    _kill(proc)
    fresh = await LibvirtConnection(domain.uri).open()  # a new process's view: only the job id
    driver = LibvirtDriver(fresh, domain.name)
    job = await driver.find_job("blockpull-0a1b2c")  # found through the domain's metadata
    assert job is not None and job.status == "running" and job.job_id == "blockpull-0a1b2c"
    assert [j.job_id for j in await driver.list_jobs()] == [f"{domain.name}/vda"]  # one job
    await driver.set_speed("blockpull-0a1b2c", 0)
    done = await follow_to_end(driver, "blockpull-0a1b2c")
    assert done.error is None
    await driver.dismiss("blockpull-0a1b2c")  # forgotten, in the domain's metadata too
    assert await LibvirtDriver(conn, domain.name).find_job("blockpull-0a1b2c") is None
    await fresh.close()
    assert_flattened(domain, data_chain)


async def test_job_finished_while_the_client_was_away(
    conn: LibvirtConnection, domain_factory: DomainFactory, data_chain: Chain
) -> None:
    domain = domain_factory(data_chain)
    proc = _start_in_other_process(domain.uri, domain.name, "blockpull-3d4e5f", 0)
    _kill(proc)
    await wait_for(lambda: domain.xml_chain() == [str(data_chain.top)], what="the pull to finish")
    fresh = await LibvirtConnection(domain.uri).open()  # connected after the job ended
    driver = LibvirtDriver(fresh, domain.name)
    assert await driver.find_job("blockpull-3d4e5f") is None
    assert await driver.pulled("vda", None)  # Completed, from libvirt's view
    await fresh.close()
    assert_flattened(domain, data_chain)


async def test_hung_libvirtd_is_bounded_and_recovers(
    conn: LibvirtConnection, libvirtd_running: LibvirtDaemon, domain_factory: DomainFactory, chain4: Chain
) -> None:
    """libvirtd stops answering (SIGSTOP): a call fails with LibvirtUnavailable after the
    connection's call_timeout (3 s in these tests) instead of blocking the loop for as long as
    the daemon hangs; after SIGCONT the connection is re-opened and a pull runs."""
    domain = domain_factory(chain4)
    driver = driver_for(conn, domain)
    libvirtd_running.hang()
    try:
        began = time.monotonic()
        with pytest.raises(HypervisorUnavailable):
            # A call blocks until keepalive gives up; then the loop is free again.
            await driver.find_job(f"{domain.name}/vda")
        assert time.monotonic() - began < 15
        assert not conn.connected
    finally:
        libvirtd_running.unhang()
    await wait_for(lambda: conn.connected, what="the reconnect", timeout=30)
    started = await driver.start(request())
    done = await follow_to_end(driver, started.job_id)
    assert done.error is None
    assert_flattened(domain, chain4)
