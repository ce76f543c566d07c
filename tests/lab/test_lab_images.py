"""Chains built by the lab hold what they claim, checked with QEMU's own tools."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from qemulab.errors import ImageCorrupt, ToolError
from qemulab.imageinfo import host_offset, image_map, is_relative
from qemulab.images import (
    Chain,
    add_reference,
    allocated_bytes,
    backing_chain,
    backing_chain_info,
    backing_names,
    check,
    compare,
    copy_chain,
    make_chain,
    warm_page_cache,
)
from qemulab.patterns import MiB, Write, default_hole, default_zero_over_data, layer_byte
from qemulab.pytest_plugin import ChainFactory

pytestmark = pytest.mark.qemu


def _qemu_io_ok(image: Path, command: str) -> bool:
    """Whether `qemu-io -c command` succeeded (a `read -P` that finds other bytes fails)."""
    done = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", command, str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def _raw_content(image: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return out.read_bytes()


def test_chain4_layout_and_relative_names(chain4: Chain) -> None:
    assert chain4.names == ["base.qcow2", "mid1.qcow2", "mid2.qcow2", "top.qcow2"]
    assert chain4.base.name == "base.qcow2"
    assert chain4.top.name == "top.qcow2"
    assert backing_chain(chain4.top) == [str(p) for p in reversed(chain4.images)]
    assert backing_names(chain4.top) == ["mid2.qcow2", "mid1.qcow2", "base.qcow2"]
    assert all(is_relative(name) for name in backing_names(chain4.top))
    infos = backing_chain_info(chain4.top)
    assert [i.backing_format for i in infos] == ["qcow2", "qcow2", "qcow2", None]
    assert {i.virtual_size for i in infos} == {64 * MiB}
    for image in chain4.images:
        assert check(image).clean


def test_reference_is_the_flattened_content(chain4: Chain, short_tmp: Path) -> None:
    assert chain4.reference is not None
    # The reference is what qemu-img convert of the top gives...
    converted = short_tmp / "converted.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(chain4.top), str(converted)], check=True)
    assert compare(converted, chain4.reference)
    assert compare(chain4.top, chain4.reference)
    assert chain4.matches()
    # ...and it equals the model computed from the writes alone, byte for byte.
    assert _raw_content(chain4.reference, short_tmp / "ref.raw") == chain4.expected_content()


def test_zero_over_data_and_holes(chain4: Chain) -> None:
    zero_off, zero_len = default_zero_over_data(chain4.size)
    # The base has data there; the top has zeroes of its own over it.
    assert _qemu_io_ok(chain4.base, f"read -P 0x{layer_byte(0):02x} {zero_off} {zero_len}")
    assert _qemu_io_ok(chain4.top, f"read -P 0 {zero_off} {zero_len}")
    assert not _qemu_io_ok(chain4.top, f"read -P 0x{layer_byte(0):02x} {zero_off} {zero_len}")
    top_map = image_map(chain4.top)
    at_zero = [e for e in top_map if e["start"] <= zero_off < e["start"] + e["length"]]
    assert at_zero[0]["depth"] == 0
    assert at_zero[0]["zero"] is True
    assert at_zero[0]["data"] is False
    # The hole is unallocated in every layer.
    hole_off, hole_len = default_hole(chain4.size)
    at_hole = [e for e in top_map if e["start"] <= hole_off < e["start"] + e["length"]]
    assert at_hole[0]["present"] is False
    assert at_hole[0]["start"] + at_hole[0]["length"] >= hole_off + hole_len


def test_allocation_counts(chain4: Chain) -> None:
    own = allocated_bytes(chain4.top)
    everything = allocated_bytes(chain4.top, include_backing=True)
    assert 0 < own < everything
    assert everything >= chain4.visible_data_bytes
    assert allocated_bytes(chain4.base) == allocated_bytes(chain4.base, include_backing=True)


def test_compare_detects_a_difference(chain4: Chain) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 4096", str(chain4.top)],
        check=True,
        capture_output=True,
    )
    assert not chain4.matches()
    with pytest.raises(ToolError):
        compare(chain4.top, chain4.directory / "missing.qcow2")


def test_copy_is_independent(chain4: Chain, short_tmp: Path) -> None:
    copy = copy_chain(chain4, short_tmp / "copy")
    assert copy.directory != chain4.directory
    assert backing_chain(copy.top) == [str(p) for p in reversed(copy.images)]
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 4096", str(copy.top)],
        check=True,
        capture_output=True,
    )
    assert not copy.matches()
    assert chain4.matches()


def test_absolute_backing_and_its_copy(chain_factory: ChainFactory, short_tmp: Path) -> None:
    chain = chain_factory(layers=3, size=8 * MiB, relative_backing=False)
    assert backing_names(chain.top) == [str(chain.images[1]), str(chain.images[0])]
    copy = copy_chain(chain, short_tmp / "abs-copy")
    assert backing_names(copy.top) == [str(copy.images[1]), str(copy.images[0])]
    assert copy.matches()


def test_link_lower_copy(chain4: Chain, short_tmp: Path) -> None:
    copy = copy_chain(chain4, short_tmp / "linked", link_lower=True)
    assert copy.base.stat().st_ino == chain4.base.stat().st_ino
    assert copy.top.stat().st_ino != chain4.top.stat().st_ino
    assert copy.matches()


def test_custom_pattern_names_and_raw_reference(chain_factory: ChainFactory, short_tmp: Path) -> None:
    pattern = [
        [Write.data(0, 2 * MiB, 0xAA), Write.data(3 * MiB, 100, 0xAB)],
        [Write.zeros(MiB, 4096), Write.data(3 * MiB + 50, 10, 0xBB)],
    ]
    chain = chain_factory(size=4 * MiB, pattern=pattern, names=["lower", "upper"], reference_format="raw")
    assert chain.names == ["lower.qcow2", "upper.qcow2"]
    assert chain.reference is not None
    assert chain.reference.read_bytes() == chain.expected_content()
    assert chain.matches()
    model = chain_factory(size=4 * MiB, pattern=pattern, reference="model")
    assert model.matches()
    assert compare(model.reference or "", chain.reference)


def test_add_reference_later(chain_factory: ChainFactory) -> None:
    chain = chain_factory(layers=2, size=8 * MiB, reference="none")
    assert chain.reference is None
    with pytest.raises(ValueError):
        chain.matches()
    add_reference(chain, reference="model")
    assert chain.matches()


def test_make_chain_refuses_bad_requests(short_tmp: Path) -> None:
    with pytest.raises(ValueError):
        make_chain(short_tmp / "a", layers=2, names=["only-one"])
    with pytest.raises(ValueError):
        make_chain(short_tmp / "b", size=1000)
    make_chain(short_tmp / "c", layers=1, size=4 * MiB)
    with pytest.raises(FileExistsError):
        make_chain(short_tmp / "c", layers=1, size=4 * MiB)


def test_host_offset_finds_the_data(chain4: Chain) -> None:
    offset = host_offset(chain4.base, 23 * MiB)
    with open(chain4.base, "rb") as f:
        f.seek(offset)
        assert f.read(512) == bytes([layer_byte(0)]) * 512


def test_check_reports_leaks_and_raises_on_corruption(chain_factory: ChainFactory) -> None:
    leaky = chain_factory(layers=1, size=4 * MiB, reference="none").base
    corrupt = chain_factory(layers=1, size=4 * MiB, reference="none").base
    for image, entry in ((leaky, 0), (corrupt, None)):
        with open(image, "r+b") as f:
            header = f.read(48)
            l1_offset = struct.unpack(">Q", header[40:48])[0]
            f.seek(l1_offset)
            old = struct.unpack(">Q", f.read(8))[0]
            new = entry if entry is not None else (old | 0x200)  # unaligned L2 table
            f.seek(l1_offset)
            f.write(struct.pack(">Q", new))
    result = check(leaky)
    assert result.leaks > 0
    assert result.corruptions == 0
    assert not result.clean
    with pytest.raises(ImageCorrupt):
        check(corrupt)


def test_spread_pattern_chain(chain_factory: ChainFactory) -> None:
    chain = chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=16 * MiB)
    assert chain.visible_data_bytes >= 16 * MiB
    assert allocated_bytes(chain.images[1], include_backing=True) >= 16 * MiB
    assert chain.matches()
    warm_page_cache(chain, include_reference=True)
