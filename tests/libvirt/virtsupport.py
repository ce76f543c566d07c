"""Helpers of the libvirt driver's tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from blockpull import pull as protocol
from blockpull.driver import Progress, StreamRequest
from blockpull.libvirt.connection import LibvirtConnection
from blockpull.libvirt.driver import LibvirtDriver
from qemulab import Chain
from qemulab.patterns import MiB
from qemulab.pytest_plugin import ChainFactory
from virtlab import Domain

#: bytes/s: the 24 MiB of `make_chain_with_data` take ~12 s at this speed.
SLOW = 2 * MiB


def make_chain_with_data(chain_factory: ChainFactory, **kwargs: Any) -> Chain:
    options: dict[str, Any] = {"layers": 4, "size": 64 * MiB, "pattern": "spread", "data_bytes": 24 * MiB}
    options.update(kwargs)
    return chain_factory(**options)


def driver_for(conn: LibvirtConnection, domain: Domain) -> LibvirtDriver:
    return LibvirtDriver(conn, domain.name)


def request(
    disk: str = "vda", *, base: str | None = None, bandwidth: int = 0, job_id: str = "bp-test"
) -> StreamRequest:
    return StreamRequest(disk=disk, job_id=job_id, base=base, bandwidth=bandwidth)


async def wait_for(
    probe: Callable[[], Any], *, what: str, timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """Await until `probe()` is truthy (exceptions count as not yet); its value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if asyncio.iscoroutine(last):
                last = await last
        except Exception as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


async def follow_to_end(driver: LibvirtDriver, job_id: str, timeout: float = 60.0) -> Progress:
    """The job's concluded record (the driver's view of libvirt's event)."""
    return await asyncio.wait_for(protocol.follow(driver, job_id, poll_interval=0.5), timeout)
