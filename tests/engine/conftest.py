"""The engine tests run against the QEMU lab (`qemulab`): real QEMU processes (no guest) over
real qcow2 chains.

The lab's fixtures (`short_tmp`, `chain4`, `chain_factory`, `vm_factory`) come from the root
conftest. Here: the default VM and the code under test's connection to it, and what the lab
has no word for.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from blockpull import pull as protocol
from blockpull.driver import Outcome
from blockpull.qmp import QMPConnection
from blockpull.qmp_driver import QMPDriver
from qemulab import Chain, QemuVM, check
from qemulab.pytest_plugin import VMFactory


@pytest.fixture
def vm(vm_factory: VMFactory, chain4: Chain) -> QemuVM:
    """QEMU (`-M none`) with `chain4` attached as libvirt-style `-blockdev` nodes."""
    return vm_factory([chain4])


@pytest.fixture
async def conn(vm: QemuVM) -> AsyncIterator[QMPConnection]:
    """The code under test's connection to the VM's `-qmp` monitor."""
    connection = await QMPConnection.open(str(vm.qmp_socket), connect_timeout=2, command_timeout=5)
    yield connection
    await connection.close()
    # Tests end QEMU with quit or SIGTERM (exit status 0) or with SIGKILL: anything else is a crash.
    assert vm.alive or vm.returncode in (0, -signal.SIGKILL), (
        f"QEMU died during the test (status {vm.returncode}): {vm.stderr_text()}"
    )


async def wait_exit(vm: QemuVM, timeout: float = 10.0) -> int:
    """Wait, without blocking the event loop, for QEMU to exit after `vm.kill(sig, wait=False)`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while vm.alive:
        assert loop.time() < deadline, f"QEMU still running {timeout} s after the signal"
        await asyncio.sleep(0.01)
    assert vm.returncode is not None
    return vm.returncode


def assert_intact(chain: Chain) -> None:
    """The top image consistent and the guest's data unchanged (with QEMU stopped, or -U)."""
    result = check(chain.top, force_share=True)  # raises ImageCorrupt on corruption
    assert result.clean, result.raw
    assert chain.matches(force_share=True), "the disk's content differs from the reference"


async def settle(conn: QMPConnection, job_id: str, poll_interval: float = 1.0) -> Outcome:
    """The engine's whole end of a job, as the CLI and the agent run it: follow it until it has
    ended, then conclude it durably (flush, finalize, flush) and dismiss it."""
    driver = QMPDriver(conn)
    await protocol.follow(driver, job_id, poll_interval=poll_interval)

    async def record(outcome: Outcome) -> None:
        assert await driver.find_job(job_id) is not None, "recorded before the job was dismissed"

    return await protocol.conclude(driver, job_id, None, record=record)
