#!/usr/bin/env python3
"""`blockpull pull --connect` against `virsh blockpull --wait` on the same libvirt domain.

Both go through libvirt's block-job API (the same `block-stream` in QEMU); this measures what
BlockPull's command costs on top of virsh's, on a real multi-GiB chain. For each of `--runs`
rounds and each tool: a fresh copy of one big qcow2 chain (`qemulab.copy_chain`, lower images
hard-linked: a full pull only writes the top), a fresh transient TCG domain created paused on
a private libvirtd (`virtlab`, started here and stopped at the end), then the tool as a
subprocess, timed from spawn to exit:

- `blockpull pull -c URI DOMAIN vda -q`
- `virsh -c URI blockpull DOMAIN vda --wait`

and, once per run, that the domain's live XML shows no backing file afterwards. Prints
medians, min and max. Run: `python3 benchmarks/bench_libvirt.py --runs 5` as root.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemulab import Chain, copy_chain, make_big_chain
from virtlab import Domain, DomainDisk, LibvirtDaemon, libvirtd_available


def cli() -> list[str]:
    script = Path(sys.executable).parent / "blockpull"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blockpull.cli"]


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def one_run(daemon: LibvirtDaemon, chain: Chain, workdir: Path, name: str, tool: str) -> float:
    copy = copy_chain(chain, workdir / name, link_lower=True)
    domain = Domain(daemon, f"bench_{name}", [DomainDisk("vda", copy.top, copy)]).create()
    try:
        if tool == "blockpull":
            elapsed = timed([*cli(), "pull", "-c", daemon.uri, domain.name, "vda", "-q"])
        else:
            elapsed = timed(["virsh", "-q", "-c", daemon.uri, "blockpull", domain.name, "vda", "--wait"])
        chain_now = domain.xml_chain()
        if chain_now != [str(copy.top)]:
            raise SystemExit(f"{tool}: the domain still has a backing chain: {chain_now}")
        return elapsed
    finally:
        domain.destroy()
        shutil.rmtree(workdir / name, ignore_errors=True)


def summary(label: str, values: list[float]) -> str:
    return (
        f"{label:<34} median {statistics.median(values) * 1000:8.1f} ms   "
        f"min {min(values) * 1000:8.1f}   max {max(values) * 1000:8.1f}   (n={len(values)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-gib", type=float, default=1.0, help="guest-visible data in the chain")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if not libvirtd_available():
        raise SystemExit("libvirtd, virtlogd, virsh, unshare and nsenter are needed (scripts/setup.sh)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-libvirt-", dir=args.workdir or "/var/tmp"))
    daemon = LibvirtDaemon()
    try:
        daemon.start()
        chain = make_big_chain(workdir / "template", args.data_gib, reference="none")
        print(
            f"chain: {len(chain.images)} images, {chain.size >> 30} GiB virtual, {args.data_gib} GiB of data"
        )
        one_run(daemon, chain, workdir, "warmup", "blockpull")  # page cache, bytecode
        results: dict[str, list[float]] = {"blockpull": [], "virsh": []}
        for index in range(args.runs):
            for tool in ("blockpull", "virsh") if index % 2 == 0 else ("virsh", "blockpull"):
                results[tool].append(one_run(daemon, chain, workdir, f"{tool}{index}", tool))
        print(summary("blockpull pull -c URI DOMAIN vda", results["blockpull"]))
        print(summary("virsh blockpull DOMAIN vda --wait", results["virsh"]))
        diff = statistics.median(results["blockpull"]) - statistics.median(results["virsh"])
        print(f"blockpull - virsh (medians): {diff * 1000:+.1f} ms")
    finally:
        daemon.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
