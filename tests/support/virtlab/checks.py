"""What a test asserts about a libvirt domain's disk after a pull, a cancel or a failure.

Every check reads the images the way their own headers chain them (`qemu-img info
--backing-chain`), never the way libvirt re-attaches them, and compares libvirt's live XML
with that: after a pull libvirt's XML must show the real, new chain.

A running QEMU keeps qcow2 metadata in memory and locks its images: checks on a running
domain read with `-U` and demand no corruption (leaks may be there until QEMU flushes). After
a pull QEMU has rewritten the header (no backing file any more) while the copied clusters'
metadata may still be in its memory (libvirt finalizes jobs itself and flushes nothing): the
data of a FLATTENED disk is therefore compared only once the domain is stopped (libvirt's
`destroy` sends SIGTERM first: QEMU flushes and quits). An intact chain is compared live: what
is on disk still reads through the old backing files.
"""

from __future__ import annotations

from pathlib import Path

from qemulab.imageinfo import is_relative
from qemulab.images import Chain, backing_chain, backing_names, check, compare
from virtlab.domains import Domain


def header_chain(image: Path, *, running: bool) -> list[str]:
    """The chain as the images' own headers record it, top first."""
    return backing_chain(image, force_share=running)


def assert_untainted(domain: Domain) -> None:
    """No taint in the domain log beyond the lab's expected `high-privileges`."""
    assert domain.unexpected_taints() == set(), domain.log_text()[-2000:]


def _assert_data(chain: Chain, *, running: bool, compare_data: bool = True) -> None:
    assert chain.reference is not None, "the chain was built without a reference"
    if compare_data:
        assert compare(chain.top, chain.reference, force_share=running), "the disk's data changed"
    result = check(chain.top, force_share=running)
    assert result.corruptions == 0
    if not running:
        assert result.clean, result.raw


def assert_intact(domain: Domain | None, chain: Chain, target: str = "vda") -> None:
    """The disk still has its whole chain (headers and, if given, libvirt's live XML), its
    data unchanged and its images valid."""
    expected = [str(p) for p in reversed(chain.images)]
    running = domain is not None and domain.active
    if domain is not None and running:
        assert domain.xml_chain(target) == expected
        assert_untainted(domain)
    assert header_chain(chain.top, running=running) == expected
    _assert_data(chain, running=running)


def assert_flattened(domain: Domain | None, chain: Chain, keep: int = 0, target: str = "vda") -> None:
    """The disk needs nothing above `chain.images[keep - 1]` (nothing at all with `keep=0`),
    in its headers and in libvirt's live XML, and shows the guest the same data."""
    expected = [str(chain.top)] + [str(p) for p in reversed(chain.images[:keep])]
    running = domain is not None and domain.active
    if domain is not None and running:
        assert domain.xml_chain(target) == expected
        assert_untainted(domain)
    assert header_chain(chain.top, running=running) == expected
    _assert_data(chain, running=running, compare_data=not running)


def top_backing_name(chain: Chain, *, running: bool = True) -> str | None:
    """The backing name recorded in the top image's header (None: no backing file)."""
    names = backing_names(chain.top, force_share=running)
    return names[0] if names else None


def assert_relative_kept(chain: Chain, keep: int, *, running: bool = True) -> None:
    """The top's header names its new base by the bare relative name, not a path."""
    name = top_backing_name(chain, running=running)
    assert name is not None and is_relative(name), name
    assert name == chain.images[keep - 1].name
