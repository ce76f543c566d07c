"""pytest fixtures for tests that need a real libvirtd with real domains.

Load with `pytest_plugins = ["virtlab.pytest_plugin"]` in the root conftest.py, or import the
fixtures by name into a directory's conftest.py.

- `libvirtd` (session): a private `LibvirtDaemon`, started once per test session, stopped by
  pid at the end (domains, libvirtd, virtlogd). Skips when libvirt is not installed. A test
  that stops or hangs it must leave it running (`libvirtd_running` checks that before each
  test that uses it).
- `domain_factory`: `domain_factory(chain, namespace="lab", vm=None, target="vda",
  paused=True)` creates a transient domain named `namespace_vm` with the chain's top as the
  disk; `domain_factory.define(...)` returns it without starting it. Every domain is destroyed
  at teardown, and a domain that picked up a taint beyond `high-privileges` fails the test.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemulab.images import Chain
from virtlab.daemon import LibvirtDaemon, libvirtd_available
from virtlab.domains import Domain, DomainDisk


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[LibvirtDaemon]:
    """The session's private libvirtd."""
    if not libvirtd_available():
        pytest.skip("libvirtd/virtlogd/virsh/unshare not installed (scripts/setup.sh installs them)")
    daemon = LibvirtDaemon()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def libvirtd_running(libvirtd: LibvirtDaemon) -> LibvirtDaemon:
    """The session's libvirtd, (re)started or resumed if an earlier test left it stopped or hung."""
    libvirtd.unhang()
    if not libvirtd.running:
        libvirtd.start_libvirtd()
    return libvirtd


class DomainFactory:
    """Makes the test's domains; `close()` destroys them all and checks their taints."""

    _names = itertools.count()

    def __init__(self, daemon: LibvirtDaemon) -> None:
        self.daemon = daemon
        self.domains: list[Domain] = []

    def define(
        self,
        chain: Chain | Path | None = None,
        *,
        namespace: str = "lab",
        vm: str | None = None,
        target: str = "vda",
        disks: list[DomainDisk] | None = None,
    ) -> Domain:
        if disks is None:
            if chain is None:
                raise ValueError("give a chain, an image or disks")
            image = chain.top if isinstance(chain, Chain) else chain
            disks = [DomainDisk(target, image, chain if isinstance(chain, Chain) else None)]
        name = f"{namespace}_{vm or f'vm{next(self._names)}'}"
        domain = Domain(self.daemon, name, disks)
        self.domains.append(domain)
        return domain

    def __call__(self, chain: Chain | Path | None = None, *, paused: bool = True, **kwargs: Any) -> Domain:
        return self.define(chain, **kwargs).create(paused=paused)

    def close(self) -> list[str]:
        """Destroy every domain; the taints found, as messages (empty: none)."""
        problems: list[str] = []
        for domain in self.domains:
            if self.daemon.running:
                taints = domain.unexpected_taints()
                if taints:
                    problems.append(f"{domain.name} tainted: {sorted(taints)}")
                domain.destroy()
        return problems


@pytest.fixture
def domain_factory(libvirtd_running: LibvirtDaemon) -> Iterator[DomainFactory]:
    factory = DomainFactory(libvirtd_running)
    problems: list[str] = []
    try:
        yield factory
    finally:
        libvirtd_running.unhang()
        if not libvirtd_running.running:
            libvirtd_running.start_libvirtd()
        problems = factory.close()
    assert not problems, problems
