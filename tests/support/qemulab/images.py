"""Building qcow2 backing chains with known content.

`make_chain` creates `base.qcow2 <- mid1.qcow2 <- ... <- top.qcow2` with `qemu-img create -b`,
fills each layer with the writes of a pattern (`qemulab.patterns`) through `qemu-io`, and
builds a reference image holding what the guest sees, to compare a streamed image against.
`make_big_chain` does the same with gigabytes of data, as fast as this machine allows, and
`copy_chain` gives each benchmark run its own fresh copy.

The inspection helpers of `qemulab.imageinfo` are re-exported here.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qemulab.imageinfo import (
    CheckResult,
    ImageInfo,
    StrPath,
    allocated_bytes,
    backing_chain,
    backing_chain_info,
    backing_names,
    check,
    compare,
    host_offset,
    image_map,
)
from qemulab.patterns import (
    CLUSTER,
    Extent,
    GiB,
    MiB,
    Pattern,
    Write,
    default_pattern,
    flatten,
    spread_pattern,
    visible_extents,
)
from qemulab.tools import QEMU_IMG, QEMU_IO, run_tool, run_tools_parallel

__all__ = [
    "Chain",
    "CheckResult",
    "ImageInfo",
    "add_reference",
    "allocated_bytes",
    "backing_chain",
    "backing_chain_info",
    "backing_names",
    "check",
    "compare",
    "copy_chain",
    "default_names",
    "host_offset",
    "image_map",
    "make_big_chain",
    "make_chain",
    "warm_page_cache",
]

ReferenceMode = Literal["convert", "model", "none"]
ReferenceFormat = Literal["qcow2", "raw"]


@dataclass
class Chain:
    """A backing chain on disk and what its guest sees.

    `images` runs bottom to top: `images[0]` is the base (no backing file), `images[-1]` the
    active image a VM writes to and a stream flattens. `reference` (None if not built) is a
    standalone image with the flattened content, in `reference_format`.
    """

    directory: Path
    images: list[Path]
    size: int
    reference: Path | None
    reference_format: str = "qcow2"
    pattern: list[list[Write]] = field(default_factory=list)
    relative_backing: bool = True
    backing_fmt: str = "qcow2"
    cluster_size: int = CLUSTER

    @property
    def base(self) -> Path:
        """The bottom image."""
        return self.images[0]

    @property
    def top(self) -> Path:
        """The active (top) image."""
        return self.images[-1]

    @property
    def names(self) -> list[str]:
        """The images' file names, bottom to top."""
        return [image.name for image in self.images]

    def layer(self, name: str) -> Path:
        """The image whose file name is `name` or `name.qcow2`."""
        for image in self.images:
            if name in (image.name, image.stem):
                return image
        raise KeyError(name)

    def extents(self) -> list[Extent]:
        """The flattened disk according to the pattern (the model, computed without QEMU)."""
        return visible_extents(self.pattern, self.size)

    def expected_content(self) -> bytes:
        """The flattened disk's bytes according to the pattern (small chains only)."""
        return flatten(self.pattern, self.size)

    @property
    def visible_data_bytes(self) -> int:
        """Bytes of non-zero data the guest sees, according to the pattern."""
        return sum(e.length for e in self.extents() if e.value)

    def matches(self, image: StrPath | None = None, *, force_share: bool = False) -> bool:
        """Whether `image` (default: the top) still shows the guest the reference content."""
        if self.reference is None:
            raise ValueError("this chain was built without a reference")
        return compare(
            image if image is not None else self.top,
            self.reference,
            force_share=force_share,
            reference_format=self.reference_format,
        )


def default_names(layers: int) -> list[str]:
    """`base`, `mid1` ... `mid{n-2}`, `top` (a single layer is just `base`)."""
    if layers < 1:
        raise ValueError(f"a chain needs at least one layer, got {layers}")
    if layers == 1:
        return ["base"]
    return ["base", *(f"mid{i}" for i in range(1, layers - 1)), "top"]


def _file_name(name: str) -> str:
    return name if "." in name else f"{name}.qcow2"


def _create_images(
    paths: Sequence[Path], size: int, relative: bool, backing_fmt: str, cluster_size: int
) -> None:
    for i, path in enumerate(paths):
        if path.exists():
            raise FileExistsError(path)
        argv = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
        if cluster_size != CLUSTER:
            argv += ["-o", f"cluster_size={cluster_size}"]
        if i > 0:
            below = paths[i - 1]
            argv += ["-b", below.name if relative else str(below), "-F", backing_fmt]
        argv += [str(path), str(size)]
        run_tool(argv)


def direct_io_supported(directory: Path) -> bool:
    """Whether files in `directory` can be opened with O_DIRECT (not on tmpfs, for one)."""
    probe = directory / f".qemulab-direct-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


def _cache_mode(directory: Path) -> str:
    # O_DIRECT writes gigabytes at disk speed and leaves no dirty pages behind to slow down
    # what runs next; where it is not supported, cache=unsafe (no flush) is the fast choice.
    return "none" if direct_io_supported(directory) else "unsafe"


def _qemu_io_argv(
    target: str, writes: Sequence[Write], cache: str, *, fmt: str | None = "qcow2"
) -> list[str]:
    argv = [QEMU_IO, "-t", cache]
    if fmt is not None:
        argv += ["-f", fmt]
    for write in writes:
        for command in write.qemu_io_commands():
            argv += ["-c", command]
    argv.append(target)
    return argv


def _standalone(path: Path) -> str:
    """A `json:` filename opening a qcow2 layer alone, without its backing file."""
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None}
    return "json:" + json.dumps(spec)


def _model_reference_argv(
    path: Path, fmt: ReferenceFormat, extents: Sequence[Extent], size: int, cache: str
) -> list[str] | None:
    """Create the reference image empty; return the qemu-io run that fills it from the model."""
    run_tool([QEMU_IMG, "create", "-q", "-f", fmt, str(path), str(size)])
    writes = [Write.data(e.offset, e.length, e.value) for e in extents if e.value]
    return _qemu_io_argv(str(path), writes, cache, fmt=fmt) if writes else None


def _write_layers(
    paths: Sequence[Path],
    pattern: Pattern,
    cluster_size: int,
    cache: str,
    *,
    parallel: bool,
    alongside: Sequence[list[str]] = (),
) -> None:
    """Fill the layers (and run the `alongside` tool runs with the parallel ones)."""
    independent: list[list[str]] = list(alongside)
    dependent: list[list[str]] = []
    for path, writes in zip(paths, pattern, strict=True):
        if not writes:
            continue
        if parallel and all(w.aligned(cluster_size) for w in writes):
            # Whole clusters only: nothing is copied up from the backing file, so the layer
            # can be written alone (json: filename, backing null), at the same time as others.
            independent.append(_qemu_io_argv(_standalone(path), writes, cache, fmt=None))
        else:
            # A partial cluster copies the rest up from below: the layers below must be final.
            dependent.append(_qemu_io_argv(str(path), writes, cache))
    run_tools_parallel(independent)
    for argv in dependent:
        run_tool(argv)


def _convert_reference(top: Path, path: Path, fmt: ReferenceFormat, cache: str) -> None:
    run_tool([QEMU_IMG, "convert", "-q", "-t", cache, "-W", "-m", "8", "-O", fmt, str(top), str(path)])


def make_chain(
    directory: StrPath,
    *,
    layers: int = 4,
    size: int = 64 * MiB,
    pattern: Literal["default", "spread"] | Pattern = "default",
    names: Sequence[str] | None = None,
    relative_backing: bool = True,
    backing_fmt: str = "qcow2",
    data_bytes: int | None = None,
    cluster_size: int = CLUSTER,
    reference: ReferenceMode = "convert",
    reference_format: ReferenceFormat = "qcow2",
    reference_name: str | None = None,
    parallel: bool = True,
) -> Chain:
    """Create a qcow2 backing chain in `directory` and fill it with known data.

    - `pattern`: `"default"` (every case a stream must handle, see
      `patterns.default_pattern`), `"spread"` (`data_bytes` of data in big aligned chunks,
      default a quarter of `size`), or explicit writes per layer, bottom first (then
      `layers` is taken from it).
    - `names`: file names bottom to top (`.qcow2` is added when a name has no dot); default
      `base`, `mid1`, ..., `top`.
    - `relative_backing`: record each backing file by its bare name (the chain then moves as
      a directory) or by its absolute path.
    - `reference`: `"convert"` builds it with `qemu-img convert` of the top (what QEMU itself
      reads), `"model"` writes it from the pattern without reading the chain (faster for big
      chains, and independent of the chain), `"none"` skips it.
    - `parallel`: write the layers whose writes are all cluster-aligned at the same time
      (and the model reference with them).

    Data is written with O_DIRECT where the filesystem allows it (fast, and no dirty page
    cache left to slow down a benchmark that runs next), else with cache=unsafe.

    Raises `FileExistsError` if an image is already there, `ToolError` if a tool fails.
    """
    directory = Path(directory).absolute()
    if isinstance(pattern, str):
        if pattern == "default":
            writes = default_pattern(layers, size)
        elif pattern == "spread":
            writes = spread_pattern(layers, size, data_bytes or size // 4)
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
    else:
        writes = [list(layer) for layer in pattern]
        layers = len(writes)
        if layers < 1:
            raise ValueError("an explicit pattern needs at least one layer")
    if names is None:
        names = default_names(layers)
    if len(names) != layers:
        raise ValueError(f"{len(names)} names for {layers} layers")
    files = [_file_name(name) for name in names]
    if len(set(files)) != len(files):
        raise ValueError(f"duplicate image names: {files}")
    extents = visible_extents(writes, size)  # also validates the writes against the size

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name for name in files]
    _create_images(paths, size, relative_backing, backing_fmt, cluster_size)
    ref_path: Path | None = None
    if reference != "none":
        ref_path = directory / (reference_name or f"reference.{reference_format}")
        if ref_path.exists():
            raise FileExistsError(ref_path)
    cache = _cache_mode(directory)
    alongside: list[list[str]] = []
    if ref_path is not None and reference == "model":
        fill = _model_reference_argv(ref_path, reference_format, extents, size, cache)
        alongside = [fill] if fill else []
    _write_layers(paths, writes, cluster_size, cache, parallel=parallel, alongside=alongside)
    if ref_path is not None and reference == "convert":
        _convert_reference(paths[-1], ref_path, reference_format, cache)
    return Chain(
        directory=directory,
        images=paths,
        size=size,
        reference=ref_path,
        reference_format=reference_format,
        pattern=writes,
        relative_backing=relative_backing,
        backing_fmt=backing_fmt,
        cluster_size=cluster_size,
    )


def make_big_chain(
    directory: StrPath,
    data_gib: float = 1.6,
    *,
    layers: int = 4,
    size: int = 4 * GiB,
    chunk: int | None = None,
    reference: ReferenceMode = "model",
    reference_format: ReferenceFormat = "qcow2",
    relative_backing: bool = True,
    names: Sequence[str] | None = None,
) -> Chain:
    """A chain holding `data_gib` GiB of guest-visible data, for benchmarks.

    The data is big aligned writes (`patterns.spread_pattern`) written to all layers at once.
    The reference comes from the model by default (`"convert"` reads the chain instead).
    """
    data = int(data_gib * GiB)
    return make_chain(
        directory,
        layers=layers,
        size=size,
        pattern=spread_pattern(layers, size, data, chunk=chunk),
        names=names,
        relative_backing=relative_backing,
        reference=reference,
        reference_format=reference_format,
    )


def copy_chain(chain: Chain, directory: StrPath, *, link_lower: bool = False) -> Chain:
    """A fresh copy of `chain` in `directory` (created if needed), for one run to modify.

    Images are copied with `cp --reflink=auto --sparse=always` (instant on filesystems with
    reflinks, a plain copy on ext4). Relative backing names keep working as they are; with
    absolute names each copy is rebased (`qemu-img rebase -u`) onto the copy below it. The
    reference is only read, so it is hard-linked when possible.

    `link_lower=True` hard-links every image but the top instead of copying it: much faster
    for big chains, but only safe when nothing writes the lower images (a full stream into
    the top writes only the top; a stream into an intermediate image or a commit would
    modify the original).
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    new_images = [directory / image.name for image in chain.images]
    copies: list[list[str]] = []
    for i, (src, dst) in enumerate(zip(chain.images, new_images, strict=True)):
        if dst.exists():
            raise FileExistsError(dst)
        if link_lower and i < len(chain.images) - 1:
            os.link(src, dst)
        else:
            copies.append(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)])
    new_ref: Path | None = None
    if chain.reference is not None:
        new_ref = directory / chain.reference.name
        try:
            os.link(chain.reference, new_ref)
        except OSError:
            copies.append(["cp", "--reflink=auto", "--sparse=always", str(chain.reference), str(new_ref)])
    run_tools_parallel(copies)
    if not chain.relative_backing:
        for below, image in itertools.pairwise(new_images):
            run_tool(
                [
                    QEMU_IMG,
                    "rebase",
                    "-u",
                    "-f",
                    "qcow2",
                    "-F",
                    chain.backing_fmt,
                    "-b",
                    str(below),
                    str(image),
                ]
            )
    return Chain(
        directory=directory,
        images=new_images,
        size=chain.size,
        reference=new_ref,
        reference_format=chain.reference_format,
        pattern=[list(layer) for layer in chain.pattern],
        relative_backing=chain.relative_backing,
        backing_fmt=chain.backing_fmt,
        cluster_size=chain.cluster_size,
    )


def add_reference(
    chain: Chain,
    *,
    reference: Literal["convert", "model"] = "convert",
    reference_format: ReferenceFormat = "qcow2",
    name: str | None = None,
) -> Path:
    """Build a reference for a chain made with `reference="none"`; sets and returns it.

    `"convert"` reads the chain as QEMU sees it now; `"model"` writes the pattern's content.
    """
    path = chain.directory / (name or f"reference.{reference_format}")
    if path.exists():
        raise FileExistsError(path)
    cache = _cache_mode(chain.directory)
    if reference == "model":
        fill = _model_reference_argv(path, reference_format, chain.extents(), chain.size, cache)
        if fill:
            run_tool(fill)
    else:
        _convert_reference(chain.top, path, reference_format, cache)
    chain.reference = path
    chain.reference_format = reference_format
    return path


def warm_page_cache(chain: Chain, *, include_reference: bool = False) -> None:
    """Read the chain's files once so that QEMU then reads them from the page cache.

    The builders write with O_DIRECT, so a fresh chain is NOT cached: a benchmark's first run
    would read from the disk and the later ones from memory. Warm first, or drop caches, to
    compare like with like.
    """
    paths = list(chain.images)
    if include_reference and chain.reference is not None:
        paths.append(chain.reference)
    block = bytearray(8 * MiB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(block):
                pass


def chain_summary(chain: Chain) -> str:
    """One JSON line describing the chain (for logs and benchmark reports)."""
    return json.dumps(
        {
            "directory": str(chain.directory),
            "images": chain.names,
            "size": chain.size,
            "visible_data_bytes": chain.visible_data_bytes,
            "relative_backing": chain.relative_backing,
        }
    )
