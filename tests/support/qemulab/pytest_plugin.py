"""pytest fixtures for tests that need real chains and real QEMU processes.

Enable with `pytest_plugins = ["qemulab.pytest_plugin"]` in the ROOT conftest.py (pytest
refuses `pytest_plugins` in deeper conftest files; there, import the fixtures by name).

Fixtures:

- `qemu_binaries`: skips the test when a QEMU binary is missing.
- `short_tmp`: a fresh short directory under /tmp (UNIX socket paths fit), removed after.
- `chain4`: a fresh copy of a 4-layer 64 MiB `default` chain (built once per session).
- `chain_factory`: `chain_factory(**make_chain_kwargs)` builds a chain in a new directory.
- `vm_factory`: `vm_factory(disks, **QemuVM_kwargs)` starts a QEMU and waits until ready
  (sync, also fine inside async tests); every VM is stopped and reaped at teardown.
- `watcher_factory`: async, `await watcher_factory(socket, **kwargs)` a started
  `QemuWatcher`, stopped at teardown.

Markers registered: `qemu` (needs QEMU), `slow` (long; deselect with `-m "not slow"`).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from qemulab.cmdline import Disk
from qemulab.images import Chain, copy_chain, make_chain
from qemulab.tmpdirs import remove_tree, short_tmpdir
from qemulab.tools import missing_tools
from qemulab.vm import QemuVM
from qemulab.watcher import QemuWatcher

ChainFactory = Callable[..., Chain]
VMFactory = Callable[..., QemuVM]


def pytest_configure(config: pytest.Config) -> None:
    """Register the lab's markers."""
    config.addinivalue_line("markers", "qemu: needs qemu-system-x86_64 / qemu-img on the machine")
    config.addinivalue_line("markers", "slow: takes long (big images); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def qemu_binaries() -> None:
    """Skip when a QEMU binary the lab needs is missing."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"QEMU tools missing: {', '.join(missing)}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory with a short path (/tmp/bpl-XXXXXXXX), removed after the test."""
    path = short_tmpdir()
    try:
        yield path
    finally:
        remove_tree(path)


@pytest.fixture(scope="session")
def chain4_template(qemu_binaries: None) -> Iterator[Chain]:
    """The session's pristine 4-layer chain; never modify it (use `chain4`)."""
    path = short_tmpdir("bpl-tpl-")
    try:
        yield make_chain(path / "chain4", layers=4)
    finally:
        remove_tree(path)


@pytest.fixture
def chain4(chain4_template: Chain, short_tmp: Path) -> Chain:
    """A fresh copy of a 4-layer `default` chain (base, mid1, mid2, top; 64 MiB) with its
    reference, in `short_tmp/chain4`, free for the test to modify."""
    return copy_chain(chain4_template, short_tmp / "chain4")


@pytest.fixture
def chain_factory(qemu_binaries: None, short_tmp: Path) -> ChainFactory:
    """`chain_factory(**kwargs)`: `make_chain` in a new subdirectory of `short_tmp`."""
    counter = itertools.count()

    def factory(**kwargs: Any) -> Chain:
        return make_chain(short_tmp / f"chain{next(counter)}", **kwargs)

    return factory


@pytest.fixture
def vm_factory(qemu_binaries: None) -> Iterator[VMFactory]:
    """`vm_factory(disks, **kwargs)`: a started, ready `QemuVM`; all stopped at teardown.

    Pass `start=False` to get it unstarted (then start it yourself; it is still stopped at
    teardown).
    """
    vms: list[QemuVM] = []

    def factory(disks: Sequence[Disk | Chain] = (), *, start: bool = True, **kwargs: Any) -> QemuVM:
        vm = QemuVM(disks, **kwargs)
        vms.append(vm)
        if start:
            vm.start_sync()
        return vm

    try:
        yield factory
    finally:
        for vm in reversed(vms):
            vm.stop_sync()


@pytest_asyncio.fixture
async def watcher_factory() -> AsyncIterator[Callable[..., Any]]:
    """`await watcher_factory(socket, **kwargs)`: a started `QemuWatcher`, stopped after."""
    watchers: list[QemuWatcher] = []

    async def factory(socket: str | Path, **kwargs: Any) -> QemuWatcher:
        watcher = QemuWatcher(socket, **kwargs)
        await watcher.start()
        watchers.append(watcher)
        return watcher

    try:
        yield factory
    finally:
        for watcher in watchers:
            await watcher.stop()
