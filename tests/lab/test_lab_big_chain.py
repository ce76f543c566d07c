"""The big chain for benchmarks: gigabytes of known data, built fast (marked slow)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qemulab.imageinfo import allocated_bytes, backing_names
from qemulab.images import copy_chain, make_big_chain
from qemulab.patterns import GiB

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def test_big_chain_holds_the_data(qemu_binaries: None, short_tmp: Path) -> None:
    started = time.monotonic()
    chain = make_big_chain(short_tmp / "big", data_gib=1.6)
    built = time.monotonic() - started
    started = time.monotonic()
    copy = copy_chain(chain, short_tmp / "copy", link_lower=True)
    copied = time.monotonic() - started
    print(
        f"\nbig chain: {chain.visible_data_bytes / GiB:.2f} GiB of data in {built:.2f} s "
        f"(reference included); link_lower copy {copied:.2f} s"
    )
    assert chain.visible_data_bytes >= 1.5 * GiB
    assert chain.size == 4 * GiB
    assert backing_names(chain.top) == ["mid2.qcow2", "mid1.qcow2", "base.qcow2"]
    below_top = allocated_bytes(chain.images[-2], include_backing=True)
    assert below_top >= 1.5 * GiB
    assert copy.matches()
