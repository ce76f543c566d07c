"""What gets written to each layer of a chain, and what the guest must then see.

A layer's content is a list of `Write`s (a data write of one repeated byte, or a zero write).
`default_pattern` gives a small chain every interesting case (shadowing, zero over data,
sub-cluster writes, holes); `spread_pattern` gives a big chain mostly made of large aligned
writes, fast to build. `visible_extents` is the independent model of the flattened disk: it
paints the writes bottom to top, with no QEMU involved, so tests can check QEMU against it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: qcow2's default cluster size; a write aligned to it never copies data up from the backing.
CLUSTER = 64 * KiB

#: qemu-io gets one command per this many bytes at most (a long write is split).
MAX_COMMAND_BYTES = 256 * MiB


@dataclass(frozen=True)
class Write:
    """One write into one layer: `pattern` repeated over `length` bytes, or zeroes when None.

    A zero write (`qemu-io write -z`) over data in a lower layer makes the guest read zeroes
    there, which a correct stream must preserve.
    """

    offset: int
    length: int
    pattern: int | None

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0:
            raise ValueError(f"bad write range: offset={self.offset} length={self.length}")
        if self.pattern is not None and not 0 <= self.pattern <= 0xFF:
            raise ValueError(f"pattern must be one byte, got {self.pattern!r}")

    @classmethod
    def data(cls, offset: int, length: int, pattern: int) -> Write:
        """A data write of the byte `pattern`."""
        return cls(offset, length, pattern)

    @classmethod
    def zeros(cls, offset: int, length: int) -> Write:
        """A zero write (`write -z`)."""
        return cls(offset, length, None)

    @property
    def is_zero(self) -> bool:
        """Whether this is a zero write."""
        return self.pattern is None

    @property
    def end(self) -> int:
        """The first byte after the write."""
        return self.offset + self.length

    def aligned(self, cluster: int = CLUSTER) -> bool:
        """Whether the write covers whole clusters only (no copy-up from the backing file)."""
        return self.offset % cluster == 0 and self.length % cluster == 0

    def qemu_io_commands(self) -> list[str]:
        """The `qemu-io -c` commands performing this write (split into bounded pieces)."""
        commands = []
        offset = self.offset
        while offset < self.end:
            length = min(MAX_COMMAND_BYTES, self.end - offset)
            if self.pattern is None:
                commands.append(f"write -z {offset} {length}")
            else:
                commands.append(f"write -P 0x{self.pattern:02x} {offset} {length}")
            offset += length
        return commands


#: Writes per layer, bottom (base) first.
Pattern = Sequence[Sequence[Write]]


@dataclass(frozen=True)
class Extent:
    """A range of the flattened disk: `value` is the byte there, 0 for zeroes, None for a hole.

    A hole is never written in any layer: unallocated everywhere, it reads as zeroes too.
    """

    offset: int
    length: int
    value: int | None

    @property
    def end(self) -> int:
        """The first byte after the extent."""
        return self.offset + self.length


def layer_byte(index: int) -> int:
    """The data byte of layer `index` in the generated patterns: 0x11, 0x22, ... 0xff, again."""
    return ((index % 15) + 1) * 0x11


def default_unit(size: int) -> int:
    """The layout unit of `default_pattern`: 1/64 of the disk (1 MiB for 64 MiB)."""
    if size <= 0 or size % (64 * CLUSTER) != 0:
        raise ValueError(f"size must be a positive multiple of {64 * CLUSTER} bytes, got {size}")
    return size // 64


def default_hole(size: int) -> tuple[int, int]:
    """(offset, length) that `default_pattern` leaves unallocated in every layer."""
    unit = default_unit(size)
    return 52 * unit, 12 * unit


def default_zero_over_data(size: int) -> tuple[int, int]:
    """(offset, length) the top zeroes in `default_pattern` over the base's data (>= 2 layers)."""
    unit = default_unit(size)
    return 2 * unit, 2 * unit


def default_pattern(layers: int, size: int) -> list[list[Write]]:
    """Writes for a chain of `layers` images of `size` bytes, every case a stream must handle.

    In units of size/64: the base holds data at [0,24) and [40,44) plus a sub-cluster write at
    48; each middle layer writes 12 units somewhere in [4,40) (shadowing the base and each
    other) and a sub-cluster write over the base's data at [41,44) (copy-up of the rest of the
    cluster); the top writes data at [8,12), zeroes [2,4) over the base's data and [14,15) over
    the first middle layer's, zeroes a sub-cluster range inside data at 20, and writes 1000
    bytes at 30. [52,64) is never written: a hole in every layer.
    """
    if layers < 1:
        raise ValueError(f"a chain needs at least one layer, got {layers}")
    unit = default_unit(size)
    writes: list[list[Write]] = []
    base = layer_byte(0)
    writes.append(
        [
            Write.data(0, 24 * unit, base),
            Write.data(40 * unit, 4 * unit, base),
            Write.data(48 * unit + 1000, 3000, base),
        ]
    )
    for i in range(1, layers - 1):
        start = 4 + (6 * (i - 1)) % 30
        writes.append(
            [
                Write.data(start * unit, 12 * unit, layer_byte(i)),
                Write.data((41 + (i - 1) % 3) * unit + 4096 * (i % 8) + 512, 2048, layer_byte(i)),
            ]
        )
    if layers >= 2:
        top = layer_byte(layers - 1)
        zero_off, zero_len = default_zero_over_data(size)
        top_writes = [
            Write.data(8 * unit, 4 * unit, top),
            Write.zeros(zero_off, zero_len),
            Write.zeros(20 * unit + 512, 4096),
            Write.data(30 * unit + 100, 1000, top),
        ]
        if layers >= 3:
            top_writes.append(Write.zeros(14 * unit, unit))
        writes.append(top_writes)
    return writes


def spread_pattern(
    layers: int,
    size: int,
    data_bytes: int,
    *,
    chunk: int | None = None,
) -> list[list[Write]]:
    """Writes for a big chain: about `data_bytes` of guest-visible data, fast to write.

    The data is cut into `chunk`-sized aligned writes spread evenly over the disk with holes
    between them, dealt round-robin to the layers below the top. The top zeroes the first
    chunk (zero over data) and writes 1 MiB of its own over the second, so the visible data is
    at least `data_bytes`. Every write is cluster-aligned, so the layers can be written in
    parallel, each without its backing file. `chunk` defaults to 1/16 of the disk, at least
    1 MiB and at most 64 MiB.
    """
    if chunk is None:
        chunk = min(64 * MiB, max(MiB, (size // 16) // MiB * MiB))
    if layers < 1:
        raise ValueError(f"a chain needs at least one layer, got {layers}")
    if data_bytes <= 0 or chunk <= 0 or chunk % MiB:
        raise ValueError("data_bytes must be positive and chunk a positive multiple of 1 MiB")
    data_bytes = -(-data_bytes // MiB) * MiB
    n_data = -(-data_bytes // chunk)
    n_chunks = n_data + 1 if layers >= 2 else n_data
    slot = (size // n_chunks) // MiB * MiB
    if slot < chunk:
        raise ValueError(f"{data_bytes} bytes in {chunk}-byte chunks (+1 zeroed) do not fit in {size} bytes")
    lower = max(1, layers - 1)
    writes: list[list[Write]] = [[] for _ in range(layers)]
    remaining = data_bytes + (chunk if layers >= 2 else 0)
    for k in range(n_chunks):
        length = min(chunk, remaining)
        remaining -= length
        layer = k % lower
        writes[layer].append(Write.data(k * slot, length, layer_byte(layer)))
    if layers >= 2:
        top = layer_byte(layers - 1)
        writes[-1].append(Write.zeros(0, chunk))
        writes[-1].append(Write.data(slot, MiB, top))
    return writes


def visible_extents(pattern: Pattern, size: int) -> list[Extent]:
    """The flattened disk as extents, from the writes alone (upper layers win; within a layer,
    later writes win). Adjacent extents with the same value are merged."""
    bounds = {0, size}
    for layer in pattern:
        for write in layer:
            if write.end > size:
                raise ValueError(f"write {write} ends past the disk size {size}")
            bounds.update((write.offset, write.end))
    points = sorted(bounds)
    ordered = [write for layer in pattern for write in layer]
    extents: list[Extent] = []
    for start, end in itertools.pairwise(points):
        value: int | None = None
        for write in reversed(ordered):
            if write.offset <= start and end <= write.end:
                value = 0 if write.pattern is None else write.pattern
                break
        if extents and extents[-1].value == value and extents[-1].end == start:
            last = extents.pop()
            extents.append(Extent(last.offset, end - last.offset, value))
        else:
            extents.append(Extent(start, end - start, value))
    return extents


def visible_data_bytes(pattern: Pattern, size: int) -> int:
    """How many bytes of the flattened disk hold non-zero data."""
    return sum(e.length for e in visible_extents(pattern, size) if e.value)


def flatten(pattern: Pattern, size: int) -> bytes:
    """The flattened disk's bytes, from the model (holes and zero writes read as zeroes).

    Builds the whole disk in memory: meant for small chains (refuses more than 1 GiB).
    """
    if size > GiB:
        raise ValueError(f"refusing to build {size} bytes in memory; use visible_extents")
    content = bytearray(size)
    for extent in visible_extents(pattern, size):
        if extent.value:
            content[extent.offset : extent.end] = bytes([extent.value]) * extent.length
    return bytes(content)
