"""Looking at images with `qemu-img`: compare, check, backing chain, allocation.

QEMU holds locks on the images it has open: while a QEMU process uses an image, these
functions need `force_share=True` (`qemu-img -U`), and then read a state that may be changing.
Compare after QEMU stopped when the answer must be exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemulab.errors import ImageCorrupt, LabError
from qemulab.tools import QEMU_IMG, run_tool

StrPath = str | os.PathLike[str]


def _share(force_share: bool) -> list[str]:
    return ["-U"] if force_share else []


def compare(
    image: StrPath,
    reference: StrPath,
    *,
    force_share: bool = False,
    strict: bool = False,
    image_format: str | None = None,
    reference_format: str | None = None,
) -> bool:
    """Whether `image` (with its backing chain) shows the guest the same bytes as `reference`.

    `qemu-img compare`: exit 0 means identical, 1 different; anything else (an image that
    cannot be opened or read) raises `ToolError`. `strict` also requires the same allocation.
    """
    argv = [QEMU_IMG, "compare", *_share(force_share)]
    if strict:
        argv.append("-s")
    if image_format:
        argv += ["-f", image_format]
    if reference_format:
        argv += ["-F", reference_format]
    argv += [os.fspath(image), os.fspath(reference)]
    return run_tool(argv, ok_codes=(0, 1)).returncode == 0


@dataclass(frozen=True)
class CheckResult:
    """What `qemu-img check` found: leaks are wasted space, not corruption."""

    filename: str
    corruptions: int
    leaks: int
    check_errors: int
    raw: dict[str, Any]

    @property
    def clean(self) -> bool:
        """No corruption, no leak, no error."""
        return not (self.corruptions or self.leaks or self.check_errors)


def check(image: StrPath, *, force_share: bool = False) -> CheckResult:
    """Run `qemu-img check`; raise `ImageCorrupt` on corruption or check errors.

    Leaked clusters (exit 3) are reported in the result, not raised: a QEMU killed mid-job
    may leak clusters, and the image is still consistent.
    """
    argv = [QEMU_IMG, "check", *_share(force_share), "--output=json", os.fspath(image)]
    done = run_tool(argv, ok_codes=(0, 2, 3))
    raw: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    result = CheckResult(
        filename=str(raw.get("filename", os.fspath(image))),
        corruptions=int(raw.get("corruptions", 0)),
        leaks=int(raw.get("leaks", 0)),
        check_errors=int(raw.get("check-errors", 0)),
        raw=raw,
    )
    if done.returncode == 2 or result.corruptions or result.check_errors:
        raise ImageCorrupt(f"qemu-img check {os.fspath(image)}: {raw or done.stderr.strip()}")
    return result


@dataclass(frozen=True)
class ImageInfo:
    """One image of a backing chain as `qemu-img info` reports it.

    `backing_filename` is the string recorded in the image header, exactly as written (a
    relative name stays relative); `full_backing_filename` is what QEMU resolved it to.
    """

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None
    full_backing_filename: str | None
    backing_format: str | None
    raw: dict[str, Any]


def backing_chain_info(image: StrPath, *, force_share: bool = False) -> list[ImageInfo]:
    """`qemu-img info --backing-chain`: the image first, then its backing file, down to the
    bottom (the opposite order of `Chain.images`)."""
    argv = [
        QEMU_IMG,
        "info",
        *_share(force_share),
        "--backing-chain",
        "--output=json",
        os.fspath(image),
    ]
    entries = json.loads(run_tool(argv).stdout)
    if isinstance(entries, dict):
        entries = [entries]
    return [
        ImageInfo(
            filename=str(entry["filename"]),
            format=str(entry["format"]),
            virtual_size=int(entry["virtual-size"]),
            actual_size=int(entry.get("actual-size", 0)),
            backing_filename=entry.get("backing-filename"),
            full_backing_filename=entry.get("full-backing-filename"),
            backing_format=entry.get("backing-filename-format"),
            raw=entry,
        )
        for entry in entries
    ]


def backing_chain(image: StrPath, *, force_share: bool = False) -> list[str]:
    """The filenames of the chain, the image first and the bottom last, as QEMU opened them."""
    return [info.filename for info in backing_chain_info(image, force_share=force_share)]


def backing_names(image: StrPath, *, force_share: bool = False) -> list[str]:
    """The backing-file strings recorded in each header of the chain, the image's first.

    The bottom image records none, so the list is one shorter than `backing_chain`.
    """
    infos = backing_chain_info(image, force_share=force_share)
    return [info.backing_filename for info in infos if info.backing_filename is not None]


def image_map(image: StrPath, *, force_share: bool = False) -> list[dict[str, Any]]:
    """`qemu-img map --output=json`: extents with `start`, `length`, `depth` (0 = this image,
    1 = its backing file, ...), `present`, `zero`, `data` and the host `offset` of data."""
    argv = [QEMU_IMG, "map", *_share(force_share), "--output=json", os.fspath(image)]
    extents: list[dict[str, Any]] = json.loads(run_tool(argv).stdout)
    return extents


def allocated_bytes(
    image: StrPath,
    *,
    include_backing: bool = False,
    force_share: bool = False,
) -> int:
    """Guest bytes allocated (data or zero clusters) in the image itself, or anywhere in its
    chain with `include_backing`. After a full stream, the top's own count equals what the
    whole chain had allocated before."""
    return sum(
        int(e["length"])
        for e in image_map(image, force_share=force_share)
        if e.get("present") and (include_backing or e["depth"] == 0)
    )


def host_offset(image: StrPath, guest_offset: int, *, force_share: bool = False) -> int:
    """Where in the image's own file the data for `guest_offset` lives.

    For blkdebug rules, whose `sector` counts in the layer's file (sector = offset // 512).
    Raises `LabError` if the image itself holds no data there.
    """
    for extent in image_map(image, force_share=force_share):
        start, length = int(extent["start"]), int(extent["length"])
        if start <= guest_offset < start + length:
            if extent["depth"] != 0 or not extent.get("data") or "offset" not in extent:
                break
            return int(extent["offset"]) + guest_offset - start
    raise LabError(f"{os.fspath(image)} holds no data of its own at guest offset {guest_offset}")


def virtual_size(image: StrPath, *, force_share: bool = False) -> int:
    """The image's virtual (guest) size in bytes."""
    return backing_chain_info(image, force_share=force_share)[0].virtual_size


def is_relative(name: str) -> bool:
    """Whether a recorded backing name is relative (neither absolute nor a `json:` string)."""
    return not name.startswith("json:") and not Path(name).is_absolute()
