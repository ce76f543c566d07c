"""Fixtures of the lab's own tests: the shared ones from `qemulab.pytest_plugin`.

pytest refuses `pytest_plugins` in a conftest below the root, so they are imported by name
(harmless when the root conftest enables the plugin too).
"""

from __future__ import annotations

import pytest

from qemulab.pytest_plugin import (
    chain4,
    chain4_template,
    chain_factory,
    qemu_binaries,
    short_tmp,
    vm_factory,
    watcher_factory,
)

__all__ = [
    "chain4",
    "chain4_template",
    "chain_factory",
    "qemu_binaries",
    "short_tmp",
    "vm_factory",
    "watcher_factory",
]


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers these tests use."""
    config.addinivalue_line("markers", "slow: takes long (big images); deselect with -m 'not slow'")
    config.addinivalue_line("markers", "qemu: needs qemu-system-x86_64 / qemu-img on the machine")
