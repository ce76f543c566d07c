"""The libvirt driver's tests run against a real, private libvirtd (`virtlab`): transient TCG
domains created paused, with real qcow2 chains from `qemulab` as disks.

One event loop serves the whole session (libvirt's event implementation is bound to one
loop), and one `LibvirtConnection` to the lab's daemon is shared by the tests, as the agent
shares one per URI. The `libvirtd` and `domain_factory` fixtures come from the root conftest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from virtsupport import make_chain_with_data, wait_for

from blockpull.libvirt.connection import LibvirtConnection
from qemulab import Chain
from qemulab.pytest_plugin import ChainFactory
from virtlab import LibvirtDaemon


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def session_conn(libvirtd: LibvirtDaemon) -> AsyncIterator[LibvirtConnection]:
    """The code under test's connection to the lab's libvirtd, for the whole session."""
    conn = LibvirtConnection(libvirtd.uri, keepalive_interval=2, keepalive_count=2, call_timeout=3)
    await conn.open()
    yield conn
    await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def conn(session_conn: LibvirtConnection, libvirtd_running: LibvirtDaemon) -> LibvirtConnection:
    """The shared connection, connected (a test that restarted libvirtd may have left it
    reconnecting)."""
    await wait_for(lambda: session_conn.connected, what="the connection to libvirtd", timeout=30)
    return session_conn


@pytest.fixture
def data_chain(chain_factory: ChainFactory) -> Chain:
    """Four layers, 64 MiB, 24 MiB of data spread over the lower three: a pull at 4 MiB/s
    takes seconds, so a test can act while it runs."""
    return make_chain_with_data(chain_factory)
