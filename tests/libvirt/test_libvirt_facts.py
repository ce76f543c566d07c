"""What libvirt 9.0 + QEMU 7.2 do that BlockPull's libvirt driver is built around, measured on
the private libvirtd (docs/libvirt.md). If one of these starts failing, the behaviour changed:
re-read the doc and the driver."""

from __future__ import annotations

import os
import signal
import time

import pytest

from qemulab import backing_chain, compare
from qemulab.patterns import MiB
from qemulab.pytest_plugin import ChainFactory
from virtlab import LibvirtDaemon
from virtlab.pytest_plugin import DomainFactory

pytestmark = pytest.mark.libvirt


def test_a_pull_libvirt_completed_is_not_durable_until_qemu_flushes(
    libvirtd_running: LibvirtDaemon, domain_factory: DomainFactory, chain_factory: ChainFactory
) -> None:
    """libvirt lets QEMU finalize the job at once (auto-finalize on): the header names no
    backing file while the copied clusters' metadata is still in QEMU's memory. A QEMU killed
    then (no guest flush in between) leaves a disk that reads wrong data. No libvirt API
    flushes a disk, so BlockPull cannot close this window on libvirt domains."""
    chain = chain_factory(layers=4, size=64 * MiB, pattern="spread", data_bytes=24 * MiB)
    domain = domain_factory(chain)
    domain.virsh("blockpull", domain.name, "vda", "--wait")
    assert domain.xml_chain() == [str(chain.top)]
    os.kill(libvirtd_running.qemu_pids()[domain.name], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while domain.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backing_chain(chain.top) == [str(chain.top)]  # the header says: flattened
    assert chain.reference is not None
    assert not compare(chain.top, chain.reference)  # but the data did not all reach the disk
