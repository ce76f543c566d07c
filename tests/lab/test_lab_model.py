"""The lab's pure parts: the content model and the QEMU command lines (no QEMU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemulab.cmdline import Disk, InjectError, Monitor, build_argv
from qemulab.patterns import (
    GiB,
    MiB,
    Write,
    default_hole,
    default_pattern,
    default_zero_over_data,
    flatten,
    layer_byte,
    spread_pattern,
    visible_data_bytes,
    visible_extents,
)
from qemulab.tmpdirs import check_socket_path

SIZE = 64 * MiB


def test_write_validation_and_commands() -> None:
    with pytest.raises(ValueError):
        Write(0, 0, 1)
    with pytest.raises(ValueError):
        Write(0, 10, 256)
    assert Write.data(0, 512, 0xAB).qemu_io_commands() == ["write -P 0xab 0 512"]
    assert Write.zeros(4096, 512).qemu_io_commands() == ["write -z 4096 512"]
    big = Write.data(0, 600 * MiB, 1).qemu_io_commands()
    assert len(big) == 3
    assert big[-1] == f"write -P 0x01 {512 * MiB} {88 * MiB}"


def test_layer_bytes_are_distinct_and_nonzero() -> None:
    values = [layer_byte(i) for i in range(15)]
    assert len(set(values)) == 15
    assert 0 not in values


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 6])
def test_default_pattern_has_every_case(layers: int) -> None:
    pattern = default_pattern(layers, SIZE)
    assert len(pattern) == layers
    extents = visible_extents(pattern, SIZE)
    assert sum(e.length for e in extents) == SIZE
    hole_off, hole_len = default_hole(SIZE)
    holes = [e for e in extents if e.value is None]
    assert any(e.offset <= hole_off and hole_off + hole_len <= e.end for e in holes)
    # every layer's byte is visible somewhere (each layer matters to the result)
    visible = {e.value for e in extents}
    assert {layer_byte(i) for i in range(layers)} <= visible
    if layers >= 2:
        zero_off, zero_len = default_zero_over_data(SIZE)
        assert any(w.offset <= zero_off and zero_off + zero_len <= w.end for w in pattern[0])
        assert [e.value for e in extents if e.offset <= zero_off < e.end] == [0]
        # sub-cluster writes exist (copy-up from the backing file)
        assert any(not w.aligned() for layer in pattern[1:] for w in layer)


def test_flatten_matches_extents() -> None:
    pattern = [[Write.data(0, 8192, 1), Write.data(100, 10, 2)], [Write.zeros(4096, 100)]]
    content = flatten(pattern, 16384)
    assert content[:100] == b"\x01" * 100
    assert content[100:110] == b"\x02" * 10
    assert content[4096:4196] == b"\x00" * 100
    assert content[4196:8192] == b"\x01" * (8192 - 4196)
    assert content[8192:] == bytes(8192)
    assert visible_data_bytes(pattern, 16384) == 8192 - 100
    with pytest.raises(ValueError):
        visible_extents([[Write.data(16000, 1000, 1)]], 16384)


def test_spread_pattern_is_aligned_and_big_enough() -> None:
    pattern = spread_pattern(4, 4 * GiB, int(1.6 * GiB))
    assert all(w.aligned() for layer in pattern for w in layer)
    assert visible_data_bytes(pattern, 4 * GiB) >= int(1.6 * GiB)
    assert pattern[-1][0].is_zero  # the top zeroes data of a lower layer
    with pytest.raises(ValueError):
        spread_pattern(4, 1 * GiB, 2 * GiB)


def _blockdevs(argv: list[str]) -> list[dict[str, object]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a in ("-blockdev", "--blockdev")]


def test_blockdev_argv_is_libvirt_style(tmp_path: Path) -> None:
    images = [tmp_path / n for n in ("a.qcow2", "b.qcow2", "c.qcow2")]
    disk = Disk(images, inject={0: [InjectError(sector=128, once=True)]}).resolve(0)
    argv = build_argv("system", [disk], [Monitor("qmp0", tmp_path / "q", main=True)], binary="q")
    nodes = _blockdevs(argv)
    by_name = {n["node-name"]: n for n in nodes}
    assert by_name["disk0-fmt0"]["backing"] is None
    assert by_name["disk0-fmt0"]["file"] == "disk0-dbg0"
    assert by_name["disk0-dbg0"]["image"] == "disk0-f0"
    assert by_name["disk0-dbg0"]["inject-error"] == [
        {"event": "read_aio", "errno": 5, "sector": 128, "once": True}
    ]
    assert by_name["disk0-fmt1"]["backing"] == "disk0-fmt0"
    assert by_name["disk0-fmt2"]["backing"] == "disk0-fmt1"
    assert by_name["disk0-fmt2"]["read-only"] is False
    assert by_name["disk0-fmt1"]["read-only"] is True
    assert disk.top == "disk0-fmt2"
    assert argv[argv.index("-M") + 1] == "none"
    assert "-qmp" in argv


def test_drive_and_device_argv(tmp_path: Path) -> None:
    odd = tmp_path / "a,b.qcow2"
    drive = Disk([odd], attach="drive", node_name="top0").resolve(0)
    device = Disk([odd], attach="device").resolve(1)
    argv = build_argv("system", [drive, device], [], binary="q")
    assert f"file={str(odd).replace(',', ',,')},format=qcow2,if=none,id=drive0,node-name=top0" in argv
    assert "virtio-blk-pci,drive=drive1,id=vdb" in argv
    assert argv[argv.index("-M") + 1] == "pc"
    assert "-S" in argv
    assert drive.top == "top0"
    assert device.top == "drive1"


def test_storage_daemon_argv(tmp_path: Path) -> None:
    disk = Disk([tmp_path / "a.qcow2"], attach="blockdev-auto").resolve(0)
    argv = build_argv("storage-daemon", [disk], [Monitor("m", tmp_path / "m")], binary="qsd")
    assert argv[:5] == [
        "qsd",
        "--chardev",
        f"socket,id=m,path={tmp_path}/m,server=on,wait=off",
        "--monitor",
        "chardev=m",
    ]
    (node,) = _blockdevs(argv)
    assert node["node-name"] == "disk0-fmt0"
    with pytest.raises(ValueError):
        build_argv("storage-daemon", [Disk([tmp_path], attach="drive").resolve(0)], [], binary="x")


def test_disk_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Disk([tmp_path / "a"], inject={3: [InjectError()]}).resolve(0)
    with pytest.raises(ValueError):
        Disk([tmp_path / "a"], attach="drive", inject={0: [InjectError()]}).resolve(0)
    with pytest.raises(ValueError):
        Disk([]).resolve(0)
    with pytest.raises(ValueError):
        check_socket_path(Path("/tmp/" + "x" * 120))
