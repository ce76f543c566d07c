"""Pulls through libvirt's block-job API, against a real libvirtd, QEMU and qcow2 chains.

After each pull: libvirt's live XML shows the new chain, the images' own headers chain the
same way, the data is unchanged (`qemu-img compare` against the chain's reference) and the
images are valid (`qemu-img check`), and the domain log shows no new taint.
"""

from __future__ import annotations

import pytest
from virtsupport import driver_for, follow_to_end, request

from blockpull.libvirt.connection import LibvirtConnection
from blockpull.pull import outcome_of
from qemulab import Chain
from qemulab.pytest_plugin import ChainFactory
from virtlab import DomainDisk, assert_flattened, assert_intact, assert_relative_kept
from virtlab.pytest_plugin import DomainFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.asyncio(loop_scope="session")]


async def test_full_pull_by_target(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain4: Chain
) -> None:
    domain = domain_factory(chain4)
    driver = driver_for(conn, domain)
    assert_intact(domain, chain4)
    started = await driver.start(request("vda"))
    assert started.released_images == tuple(str(p) for p in reversed(chain4.images[:-1]))
    assert started.chain[0].virtual_size == chain4.size
    assert [i.node for i in started.chain] == ["vda", "vda[2]", "vda[3]", "vda[4]"]
    done = await follow_to_end(driver, "bp-test")  # the id asked for finds it too
    assert outcome_of(done) is not None and done.error is None and done.job_id == "bp-test"
    assert await driver.pulled("vda", None)
    assert_flattened(domain, chain4)
    domain.destroy()  # QEMU flushes and quits: the images must now be exactly right
    assert_flattened(None, chain4)


async def test_full_pull_by_path(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain4: Chain
) -> None:
    domain = domain_factory(chain4)
    driver = driver_for(conn, domain)
    started = await driver.start(request(str(chain4.top)))
    assert started.device == "vda"
    done = await follow_to_end(driver, started.job_id)
    assert done.error is None
    assert_flattened(domain, chain4)
    domain.destroy()
    assert_flattened(None, chain4)


@pytest.mark.parametrize("by", ["path", "index"])
async def test_pull_to_base_keeps_relative_name(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain4: Chain, by: str
) -> None:
    assert chain4.relative_backing
    domain = domain_factory(chain4)
    driver = driver_for(conn, domain)
    base = str(chain4.images[1]) if by == "path" else "vda[3]"  # mid1
    started = await driver.start(request(base=base))
    assert started.base_node == "vda[3]"
    assert started.released_images == (str(chain4.images[2]),)
    done = await follow_to_end(driver, started.job_id)
    assert done.error is None
    assert await driver.pulled("vda", base)
    assert_flattened(domain, chain4, keep=2)
    assert_relative_kept(chain4, keep=2)
    domain.destroy()
    assert_flattened(None, chain4, keep=2)


async def test_pull_to_base_absolute_chain(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain_factory: ChainFactory
) -> None:
    """A chain recorded with absolute names: libvirt refuses RELATIVE, the driver pulls without."""
    chain = chain_factory(layers=3, relative_backing=False)
    domain = domain_factory(chain)
    driver = driver_for(conn, domain)
    await driver.start(request(base=str(chain.base)))
    done = await follow_to_end(driver, f"{domain.name}/vda")
    assert done.error is None
    assert_flattened(domain, chain, keep=1)


async def test_disk_without_backing_file(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain_factory: ChainFactory
) -> None:
    chain = chain_factory(layers=1)
    domain = domain_factory(chain)
    driver = driver_for(conn, domain)
    started = await driver.start(request())
    assert started.released_images == ()
    done = await follow_to_end(driver, started.job_id)
    assert outcome_of(done) is not None and done.error is None
    assert_flattened(domain, chain)


async def test_second_disk_is_pulled_alone(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain_factory: ChainFactory
) -> None:
    a, b = chain_factory(layers=3), chain_factory(layers=3)
    domain = domain_factory(disks=[DomainDisk("vda", a.top, a), DomainDisk("vdb", b.top, b)])
    driver = driver_for(conn, domain)
    started = await driver.start(request("vdb"))
    assert started.job_id == f"{domain.name}/vdb"
    await follow_to_end(driver, started.job_id)
    assert_flattened(domain, b, target="vdb")
    assert_intact(domain, a, target="vda")


async def test_jobs_that_end_at_once_never_crash_qemu(
    conn: LibvirtConnection, domain_factory: DomainFactory, chain_factory: ChainFactory
) -> None:
    """Pulls that conclude within milliseconds, with the chain read right after each: the
    driver must never ask libvirt for block info (`query-named-block-nodes`) in the window
    where QEMU 7.2 crashes on it (a concluded, not yet dismissed stream job)."""
    chain = chain_factory(layers=4)
    domain = domain_factory(chain)
    driver = driver_for(conn, domain)
    for keep in (3, 2, 1):  # each pull removes one image: nothing left to copy, ends at once
        started = await driver.start(request(base=str(chain.images[keep - 1])))
        await driver.chain("vda")
        await driver.list_jobs()
        done = await follow_to_end(driver, started.job_id)
        assert done.error is None
        await driver.dismiss(started.job_id)
    assert domain.active, domain.log_text()[-2000:]
    assert "reason=crashed" not in domain.log_text()
    assert_flattened(domain, chain, keep=1)
