"""Fixtures for the `blockpull` command tests: real QEMU processes over real qcow2 chains.

Every test here starts the console script (the one installed next to this Python, else
`python -m blockpull.cli`) as a subprocess, through pipes or a pseudo-terminal, as an
administrator would, against a `qemu-system-x86_64 -M none` built by `qemulab` with libvirt
style `-blockdev` nodes. Nothing of QEMU is mocked. The lab watches and steers QEMU on a
monitor of its own, so it never takes the `-qmp` monitor away from the command under test.

The chains and QEMU processes come from `qemulab.pytest_plugin` (imported by name: pytest
takes `pytest_plugins` only in the root conftest).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest

from qemulab import AttachMode, Disk, InjectError
from qemulab.patterns import MiB, spread_pattern
from qemulab.pytest_plugin import ChainFactory, VMFactory, chain_factory, qemu_binaries, short_tmp, vm_factory

from .support import Lab

__all__ = ["chain_factory", "qemu_binaries", "short_tmp", "vm_factory"]

LabFactory = Callable[..., Lab]


@pytest.fixture
def make_lab(chain_factory: ChainFactory, vm_factory: VMFactory) -> LabFactory:
    """Build a chain and start a QEMU on it (stopped at the end of the test, if still running).

    `throttleable=True` builds 48 MiB of data spread over 128 MiB in big chunks (a pull at
    `--bandwidth 24Mi` takes about two seconds); otherwise the lab's default pattern (every
    case a stream must handle, 64 MiB). `inject` puts blkdebug error rules on layers; `attach`
    is how QEMU opens the chain (`qemulab.cmdline`: libvirt-style blockdev nodes by default).
    """

    def factory(
        *,
        layers: int = 4,
        throttleable: bool = False,
        inject: Mapping[int, Sequence[InjectError]] | None = None,
        attach: AttachMode = "blockdev",
    ) -> Lab:
        if throttleable:
            size = 128 * MiB
            chain = chain_factory(pattern=spread_pattern(layers, size, 48 * MiB, chunk=4 * MiB), size=size)
        else:
            chain = chain_factory(layers=layers, size=64 * MiB)
        vm = vm_factory([Disk(chain, attach=attach, inject=inject or {})])
        return Lab(vm, chain, vm.disks[0])

    return factory


@pytest.fixture
def lab(make_lab: LabFactory) -> Lab:
    return make_lab()


@pytest.fixture
def slow_lab(make_lab: LabFactory) -> Lab:
    return make_lab(throttleable=True)
