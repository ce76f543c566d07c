#!/usr/bin/env python3
"""One node agent serving many BlockPulls on many libvirt domains: bench_operator.py on libvirt.

The same run, numbers and report as `bench_operator.py` (the API stand-in, ONE agent process,
the watch, the burst of creates, the write budget, CPU and RSS), with the VMs replaced:

- a private libvirtd (`virtlab.LibvirtDaemon`: its own mount namespace, sockets and logs,
  stopped at the end) and `--vms` transient TCG domains (`<domain type='qemu'>`, created
  paused, as the libvirt tests do), named `bench_vm-NN`, each with `--disks-per-vm` qcow2
  chains as disks `vda`, `vdb`... given by their active image only (libvirt reads each chain
  from the image headers);
- the agent with `BLOCKPULL_LIBVIRT_URI` set to that libvirtd and `BLOCKPULL_DOMAIN_TEMPLATE`
  `{namespace}_{vm}`; every BlockPull names its disk by target (`spec.disk: vda`).

The job timestamps come from beside the agent, never through it (`libvirt_jobs`): QEMU's own
job events (created, pending, concluded) from libvirtd's log of its QEMU monitor traffic, and
libvirt's `BLOCK_JOB_2` events on a connection of the benchmark's own (their arrival time).
"Copy done" is QEMU's `pending` (libvirt runs pulls with auto-finalize on: `concluded`
follows within microseconds).

Then it checks every disk: libvirt's live XML shows the active image alone (no backing
store), the domain picked up no taint beyond the lab's `high-privileges`, no job is left
(`blockJobInfo`); then the domains are destroyed (QEMU gets SIGTERM first and flushes), and
each active image, as its own header chains it, has no backing file, passes `qemu-img check`
and is identical to its reference (`qemu-img compare`).

Run as root: `.venv/bin/python benchmarks/bench_operator_libvirt.py` (same options as bench_operator.py,
see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import string
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench_operator import NAMESPACE, Pull, in_threads, make_parser, run_and_report, vm_name
from libvirt_jobs import CANCELED, COMPLETED, FAILED, BlockJobEvents, qemu_job_events

from qemulab import Chain, ImageCorrupt, backing_chain, check, compare
from qemulab.tools import qemu_available
from virtlab import Domain, DomainDisk, LibvirtDaemon, libvirtd_available, xml_chain

DOMAIN_TEMPLATE = "{namespace}_{vm}"


def domain_name(vm: str) -> str:
    return DOMAIN_TEMPLATE.format(namespace=NAMESPACE, vm=vm)


def target_name(index: int) -> str:
    return f"vd{string.ascii_lowercase[index]}"


class LibvirtVMs:
    """`--vms` transient TCG domains on a private libvirtd, reached by the agent through it."""

    where = "libvirt"
    vms_label = "libvirt domains"
    start_note = "agent: XML, blockInfo, blockPull (libvirtd: block-stream)"
    completion_note = "libvirtd finalizes; agent: event, job info, status write"

    def __init__(self, libvirtd_log: Path | None = None) -> None:
        self.daemon: LibvirtDaemon | None = None
        self.domains: list[Domain] = []
        self.observer: BlockJobEvents | None = None
        self.keep_log = libvirtd_log

    async def start(self, args: argparse.Namespace, chains: list[list[Chain]]) -> list[Pull]:
        t = time.monotonic()
        self.daemon = LibvirtDaemon()
        await asyncio.to_thread(self.daemon.start)
        print(f"private libvirtd up in {time.monotonic() - t:.1f}s: {self.daemon.uri}", flush=True)
        pulls: list[Pull] = []
        for v, vm_chains in enumerate(chains):
            vm = vm_name(v)
            disks = [DomainDisk(target_name(d), chain.top, chain) for d, chain in enumerate(vm_chains)]
            self.domains.append(Domain(self.daemon, domain_name(vm), disks))
            pulls += [
                Pull(f"pull-{vm}-d{d}", vm, target_name(d), chain, 0) for d, chain in enumerate(vm_chains)
            ]
        t = time.monotonic()
        for domain in self.domains:  # one after another: ~0.5 s each
            await asyncio.to_thread(domain.create)
        self.observer = BlockJobEvents(self.daemon.uri).start()
        print(
            f"started {len(self.domains)} paused TCG domains, {len(pulls)} disks, "
            f"in {time.monotonic() - t:.1f}s",
            flush=True,
        )
        return pulls

    def agent_env(self) -> dict[str, str]:
        assert self.daemon is not None
        return {"BLOCKPULL_LIBVIRT_URI": self.daemon.uri, "BLOCKPULL_DOMAIN_TEMPLATE": DOMAIN_TEMPLATE}

    def cpu_groups(self) -> dict[str, list[int]]:
        assert self.daemon is not None
        libvirtd = self.daemon.libvirtd_pid
        return {"QEMUs": list(self.daemon.qemu_pids().values()), "libvirtd": [libvirtd] if libvirtd else []}

    async def collect(self, pulls: list[Pull]) -> int:
        assert self.daemon is not None and self.observer is not None
        daemon, observer = self.daemon, self.observer
        if self.keep_log is not None:
            shutil.copyfile(daemon.libvirtd_log, self.keep_log)
        jobs = await asyncio.to_thread(
            qemu_job_events, daemon.libvirtd_log, [domain.name for domain in self.domains]
        )
        for pull in pulls:
            domain = domain_name(pull.vm)
            job = jobs.get((domain, pull.disk))
            if job is not None:
                for status, key in (
                    ("created", "created"),
                    ("pending", "copied"),
                    ("concluded", "concluded"),
                ):
                    if status in job.times:
                        pull.qemu[key] = job.times[status]
                if job.completed is not None:
                    pull.qemu["completed"] = job.completed
                pull.jobs_started = job.created
                if job.error:
                    pull.qemu_error = job.error
            ended = observer.first(domain, pull.disk, COMPLETED, FAILED, CANCELED)
            if ended is not None:
                pull.qemu["event"] = ended.arrived
                if ended.status != COMPLETED:
                    pull.qemu_error = pull.qemu_error or f"libvirt: job {ended.status} (not completed)"

        def left(pull: Pull) -> int:
            return 1 if observer.job_info(domain_name(pull.vm), pull.disk) else 0

        return sum(await asyncio.to_thread(lambda: [left(pull) for pull in pulls]))

    async def verify(self, pulls: list[Pull]) -> list[str]:
        assert self.daemon is not None
        problems: list[str] = []
        # libvirt's own view, live: the active image alone, no backing store; no new taint.
        by_domain = {domain.name: domain for domain in self.domains}
        wanted = {domain_name(pull.vm) for pull in pulls}
        live = {name: await asyncio.to_thread(by_domain[name].live_xml) for name in sorted(wanted)}
        for pull in pulls:
            chain = xml_chain(live[domain_name(pull.vm)], pull.disk)
            if chain != [str(pull.chain.top)]:
                problems.append(f"{pull.name}: libvirt's live XML still chains {pull.disk}: {chain}")
        for name in sorted(wanted):
            taints = by_domain[name].unexpected_taints()
            if taints:
                problems.append(f"{name} tainted: {sorted(taints)}")
        # The images, once QEMU has flushed and quit (libvirt's destroy sends SIGTERM first).
        for domain in self.domains:
            await asyncio.to_thread(domain.destroy)

        def verify(pull: Pull) -> str | None:
            top = pull.chain.top
            chain = backing_chain(top)
            if chain != [str(top)]:
                return f"{pull.name}: {top} still chains {chain[1:]} in its header"
            try:
                result = check(top)
            except ImageCorrupt as exc:
                return f"{pull.name}: {exc}"
            if not result.clean:
                return f"{pull.name}: qemu-img check {top}: {result.raw}"
            assert pull.chain.reference is not None
            if not compare(top, pull.chain.reference):
                return f"{pull.name}: {top} differs from its reference"
            return None

        return problems + await in_threads(verify, pulls)

    async def close(self) -> None:
        if self.observer is not None:
            await asyncio.to_thread(self.observer.stop)
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.daemon.close)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(
        __doc__, vm_word="libvirt domain", agent_log="/var/tmp/bench_operator_libvirt-agent.log"
    )
    parser.add_argument(
        "--libvirtd-log", type=Path, help="keep a copy of libvirtd's log (its QEMU monitor traffic)"
    )
    args = parser.parse_args(argv)
    if args.vms < 1 or not 1 <= args.disks_per_vm <= len(string.ascii_lowercase):
        parser.error("--vms must be at least 1 and --disks-per-vm 1 to 26")
    if not qemu_available() or not libvirtd_available():
        parser.error("the QEMU tools and libvirt are needed (scripts/setup.sh installs them)")
    return run_and_report(args, LibvirtVMs(args.libvirtd_log))


if __name__ == "__main__":
    sys.exit(main())
