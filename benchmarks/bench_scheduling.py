#!/usr/bin/env python3
"""Node scheduling at scale: 1000 BlockPulls on 100 QEMUs, one agent, BLOCKPULL_MAX_CONCURRENT=8.

Sets up, all on this machine (the pieces are bench_operator.py's):
- the Kubernetes API stand-in in its own process, recording every request;
- `--vms` QEMUs (`-M none`) with `--disks-per-vm` small qcow2 chains each. The agent reaches
  each QEMU through a counting proxy at the socket template's path: every QMP command the agent
  sends is counted and timed, per VM. A second monitor records QEMU's job events with QEMU's
  own timestamps;
- ONE agent process with `BLOCKPULL_MAX_CONCURRENT=--limit`.

Then it creates one BlockPull per disk, all at once, waits until all are Completed, and reports:
1. the limit as QEMU saw it: the most jobs alive at once (created -> dismissed, from QEMU's
   events), and how far the start order strays from the queue's order
   (creationTimestamp, then namespace/name);
2. what a queued object costs: status writes between its Queued write and its Running write
   (the contract: none), and QMP commands sent to a VM more than `--grace` seconds before its
   first job was created, i.e. while all its objects were queued (the contract: none);
3. the time from a slot freeing (a job dismissed) to the next job's creation in QEMU, p50/p99;
4. API writes per object, agent CPU per object, agent peak RSS (target < 200 MiB);
and checks the outcome: all Completed, no job left, every sampled disk flat and identical to its
reference (`qemu-img compare`) as its header chains it.

Run: `.venv/bin/python benchmarks/bench_scheduling.py` (options: --help; numbers in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from bench_operator import (
    AGENT_USER,
    GROUP,
    NAMESPACE,
    NODE,
    PLURAL,
    VERSION,
    AgentProcess,
    PhaseWatch,
    StandIn,
    Writes,
    body_of,
    build_chains,
    dist,
    vm_name,
)

from blockpull.quantity import format_bytes, parse_bandwidth
from qemulab import Chain, Disk, QemuVM, QemuWatcher, backing_chain_info, compare
from qemulab.tmpdirs import remove_tree, short_tmpdir
from qemulab.tools import qemu_available

TARGET_RSS_MIB = 200.0


# --- the counting QMP proxy --------------------------------------------------------------------


@dataclass
class QMPProxy:
    """Listens where the agent looks for a VM's socket and forwards to QEMU's monitor, noting
    the time of every command (`"execute"`) the agent sends."""

    listen: Path
    target: Path
    commands: list[float] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.listen))

    async def _serve(self, agent_r: asyncio.StreamReader, agent_w: asyncio.StreamWriter) -> None:
        try:
            qemu_r, qemu_w = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            agent_w.close()
            return
        await asyncio.gather(
            self._pump(agent_r, qemu_w, count=True), self._pump(qemu_r, agent_w, count=False)
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool) -> None:
        tail = b""
        try:
            while chunk := await reader.read(65536):
                if count:
                    seen = tail + chunk
                    self.commands.extend([time.time()] * seen.count(b'"execute"'))
                    tail = seen[-9:]
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()


# --- one BlockPull ------------------------------------------------------------------------------


@dataclass
class Pull:
    name: str
    vm: str
    disk: str
    chain: Chain
    uid: str = ""
    created_at: str = ""  # metadata.creationTimestamp
    create_end: float = math.nan  # time.time() when the create call returned
    job: dict[str, float] = field(default_factory=dict)  # QEMU status -> QEMU's time

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BlockPull",
            "metadata": {"name": self.name},
            "spec": {"nodeName": NODE, "vm": self.vm, "disk": self.disk},
        }


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Results:
    pulls: list[Pull]
    proxies: dict[str, QMPProxy]
    writes: Writes
    ready_cpu: float
    end_cpu: float
    peak_rss_kib: int
    final: Counter[str]
    leftover_jobs: int
    problems: list[str]
    checked: int
    burst_start: float
    all_done: float
    per_pull: int
    load_before: str  # /proc/loadavg when the run started


async def run(args: argparse.Namespace) -> Results:
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="bpsched-", dir="/var/tmp"))
    socket_dir = short_tmpdir("bps-")
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    server: StandIn | None = None
    vms: list[QemuVM] = []
    watchers: list[QemuWatcher] = []
    proxies: dict[str, QMPProxy] = {}
    agent: AgentProcess | None = None
    phase_watch: PhaseWatch | None = None
    admin: Any = None
    try:
        t = time.monotonic()
        # bench_operator's chains: one template, a copy per disk with the lower image hard-linked.
        template = argparse.Namespace(
            layers=2, disk_size=args.disk_size, data=args.data, vms=args.vms, disks_per_vm=args.disks_per_vm
        )
        chains = await asyncio.to_thread(build_chains, template, workdir)
        print(f"built {args.vms * args.disks_per_vm} chains in {time.monotonic() - t:.1f}s", flush=True)
        server = StandIn(in_process=False)
        admin_kubeconfig = server.write_kubeconfig(workdir / "kubeconfig-admin", user="admin")
        agent_kubeconfig = server.write_kubeconfig(workdir / "kubeconfig-agent", user=AGENT_USER)
        (socket_dir / NAMESPACE).mkdir(parents=True)
        (socket_dir / "qemu").mkdir()
        pulls: list[Pull] = []
        for v, vm_chains in enumerate(chains):
            name = vm_name(v)
            qemu_socket = socket_dir / "qemu" / f"{v}.qmp"
            extra = [
                "-chardev", f"socket,id=bp,path={qemu_socket},server=on,wait=off",
                "-mon", "chardev=bp,mode=control",
            ]  # fmt: skip
            vm = QemuVM([Disk(c) for c in vm_chains], extra_monitors=1, extra_args=extra, ready_timeout=120)
            vms.append(vm)
            proxies[name] = QMPProxy(socket_dir / NAMESPACE / f"{name}.qmp", qemu_socket)
            for d, chain in enumerate(vm_chains):
                pulls.append(Pull(f"pull-{name}-d{d}", name, vm.disks[d].top, chain))
        t = time.monotonic()
        for batch in range(0, len(vms), 20):  # 100 QEMUs at once starve each other's start
            await asyncio.gather(*(vm.start() for vm in vms[batch : batch + 20]))
        for vm in vms:
            watcher = QemuWatcher(vm.extra_sockets[0], names=["JOB_STATUS_CHANGE"])
            watchers.append(await watcher.start())
        for proxy in proxies.values():
            await proxy.start()
        print(f"started {len(vms)} QEMUs ({len(pulls)} disks) in {time.monotonic() - t:.1f}s", flush=True)

        phase_watch = PhaseWatch(admin_kubeconfig, NAMESPACE)
        phase_watch.start()
        agent_args = argparse.Namespace(
            interval=args.interval,
            poll_interval=args.poll_interval,
            log_level="INFO",
            agent_env=[f"BLOCKPULL_MAX_CONCURRENT={args.limit}", *args.agent_env],
            agent_profile=None,
        )
        agent = AgentProcess(agent_kubeconfig, socket_dir, args.agent_log, agent_args)
        agent.start()
        ready_cpu = agent.sample().cpu
        print(f"agent pid {agent.pid} ready; its log: {args.agent_log}", flush=True)
        await asyncio.sleep(1)

        admin = kubernetes.config.new_client_from_config(config_file=str(admin_kubeconfig))  # type: ignore[no-untyped-call]
        custom = kubernetes.client.CustomObjectsApi(admin)

        def create(pull: Pull) -> None:
            body = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, pull.manifest())
            pull.uid = str(body["metadata"]["uid"])  # type: ignore[index]
            pull.created_at = str(body["metadata"]["creationTimestamp"])  # type: ignore[index]
            pull.create_end = time.time()

        order = sorted(pulls, key=lambda p: (int(p.name.rsplit("-d", 1)[1]), p.vm))
        burst_start = time.time()
        with ThreadPoolExecutor(max_workers=8) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, create, p) for p in order))
        print(f"created {len(pulls)} BlockPulls in {time.time() - burst_start:.1f}s", flush=True)

        deadline = time.monotonic() + args.timeout
        next_print = time.monotonic() + 10
        while True:
            phases = phase_watch.phases()
            if phases["Completed"] + phases["Failed"] >= len(pulls):
                break
            if agent.exited() is not None:
                raise SystemExit(f"the agent exited with {agent.exited()}; see {args.agent_log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"not all finished within {args.timeout:g}s: {dict(phases)}")
            if time.monotonic() >= next_print:
                print(f"  {time.time() - burst_start:5.0f}s: {dict(sorted(phases.items()))}", flush=True)
                next_print += 10
            await asyncio.sleep(0.1)
        all_done = time.time()
        print(f"all finished {all_done - burst_start:.1f}s after the first create", flush=True)
        deadline = time.monotonic() + 30
        while any((o.get("metadata") or {}).get("finalizers") for o in server.objects()):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        end_cpu = agent.sample().cpu
        peak_rss_kib = agent.peak_rss_kib()
        agent.stop()

        by_job = {f"blockpull-{p.uid}": p for p in pulls}
        leftover = 0
        for vm, watcher in zip(vms, watchers, strict=True):
            for ev in watcher.events():
                pull = by_job.get(str(ev.data.get("id")))
                if pull is not None and ev.qemu_time is not None:
                    pull.job.setdefault(str(ev.data.get("status")), ev.qemu_time)
            jobs = await vm.execute("query-jobs")
            leftover += len(jobs) if isinstance(jobs, list) else 0
            await watcher.stop()
        watchers.clear()
        final = phase_watch.phases()
        phase_watch.stop()
        await asyncio.gather(*(vm.stop() for vm in vms))
        for proxy in proxies.values():
            await proxy.stop()

        sample = pulls[:: max(1, len(pulls) // args.verify_sample)] if args.verify_sample else pulls

        def verify(pull: Pull) -> str | None:
            top = backing_chain_info(pull.chain.top)[0]
            if top.backing_filename is not None:
                return f"{pull.name}: still has backing file {top.backing_filename}"
            assert pull.chain.reference is not None
            return None if compare(pull.chain.top, pull.chain.reference) else f"{pull.name}: differs"

        with ThreadPoolExecutor(max_workers=4) as pool:
            problems = [
                p for p in await asyncio.gather(*(loop.run_in_executor(pool, verify, p) for p in sample)) if p
            ]
        agent_writes = [r for r in server.requests() if r.user == AGENT_USER and r.is_write]
        return Results(
            pulls=pulls,
            proxies=proxies,
            writes=Writes.split(agent_writes),
            ready_cpu=ready_cpu,
            end_cpu=end_cpu,
            peak_rss_kib=peak_rss_kib,
            final=final,
            leftover_jobs=leftover,
            problems=problems,
            checked=len(sample),
            burst_start=burst_start,
            all_done=all_done,
            per_pull=args.data,
            load_before=load_before,
        )
    finally:
        if phase_watch is not None:
            phase_watch.stop()
        if agent is not None:
            agent.stop()
        for watcher in watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        if vms:
            await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)
        for proxy in proxies.values():
            await proxy.stop()
        if admin is not None:
            admin.close()
        if server is not None:
            server.stop()
        remove_tree(socket_dir)
        remove_tree(workdir)


# --- the numbers ------------------------------------------------------------------------------------


def most_alive(pulls: Sequence[Pull]) -> int:
    """The most jobs alive in QEMU at once: from `created` to dismissed (`null`)."""
    edges = []
    for p in pulls:
        if "created" in p.job:
            edges.append((p.job["created"], 1))
            edges.append((p.job.get("null", math.inf), -1))
    alive = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        alive += step
        peak = max(peak, alive)
    return peak


def slot_to_start(pulls: Sequence[Pull], limit: int) -> list[float]:
    """With every slot busy, the k-th job beyond the limit can start only after the k-th
    dismissal: the time between them is what the agent takes to hand a freed slot on."""
    starts = sorted(p.job["created"] for p in pulls if "created" in p.job)
    frees = sorted(p.job["null"] for p in pulls if "null" in p.job)
    return [start - free for start, free in zip(starts[limit:], frees, strict=False)]


def out_of_order(pulls: Sequence[Pull], w: Writes, *, jitter: float = 0.2) -> int:
    """Pairs (a, b) where a comes first in the queue's order (creationTimestamp, then name),
    a was in the queue (its Queued status written) before b's job started, and yet b's job
    started more than `jitter` s before a's (two starts granted together may reach QEMU in
    either order). Objects the agent had not seen yet are not in its queue: their watch events
    may arrive seconds after the create in a burst, so the Queued write is the entry time."""
    queued_at = {p.name: first_queued(w, p.name) for p in pulls}
    started = [p for p in pulls if "created" in p.job and queued_at[p.name] is not None]
    count = 0
    for a in started:
        entered = queued_at[a.name]
        assert entered is not None
        for b in pulls:
            if (
                "created" in b.job
                and (a.created_at, a.name) < (b.created_at, b.name)
                and entered + jitter < b.job["created"]
                and b.job["created"] + jitter < a.job["created"]
            ):
                count += 1
    return count


def first_queued(w: Writes, name: str) -> float | None:
    for req in sorted(w.status.get(name, []), key=lambda r: r.time):
        if (body_of(req).get("status") or {}).get("reason") == "Queued":
            return req.time
    return None


def queued_writes(w: Writes, pulls: Sequence[Pull]) -> tuple[int, list[int]]:
    """Objects that were queued, and for each the status writes after its first Queued write
    and before its first Running one."""
    queued, between = 0, []
    for p in pulls:
        reqs = sorted(w.status.get(p.name, []), key=lambda r: r.time)
        reasons = [(body_of(r).get("status") or {}).get("reason") for r in reqs]
        phases = [(body_of(r).get("status") or {}).get("phase") for r in reqs]
        if "Queued" not in reasons:
            continue
        queued += 1
        first = reasons.index("Queued")
        running = next((i for i, ph in enumerate(phases) if ph == "Running"), len(phases))
        between.append(max(0, running - first - 1))
    return queued, between


def report(args: argparse.Namespace, r: Results) -> bool:
    pulls, n = r.pulls, len(r.pulls)
    peak = most_alive(pulls)
    gaps = slot_to_start(pulls, args.limit)
    queued, between = queued_writes(r.writes, pulls)
    inversions = out_of_order(pulls, r.writes)
    first_job: defaultdict[str, float] = defaultdict(lambda: math.inf)
    for p in pulls:
        first_job[p.vm] = min(first_job[p.vm], p.job.get("created", math.inf))
    early = {
        vm: sum(1 for t in proxy.commands if r.burst_start <= t < first_job[vm] - args.grace)
        for vm, proxy in r.proxies.items()
    }
    qmp_total = sum(len(proxy.commands) for proxy in r.proxies.values())
    status_writes = [len(r.writes.status.get(p.name, [])) for p in pulls]
    events = [len(r.writes.events.get(p.name, [])) for p in pulls]
    meta = [
        len(r.writes.finalizers.get(p.name, [])) + len(r.writes.other_meta.get(p.name, [])) for p in pulls
    ]
    cpu = r.end_cpu - r.ready_cpu
    peak_mib = r.peak_rss_kib / 1024
    ok = (
        r.final["Completed"] == n
        and not r.problems
        and r.leftover_jobs == 0
        and (args.limit == 0 or peak <= args.limit)
        and not any(between)
        and not any(early.values())
        and inversions == 0
    )
    rows = [
        ("most jobs alive at once in QEMU", f"{peak}", f"limit {args.limit or 'none'}"),
        ("started before an earlier object already queued", f"{inversions}",
         "pairs; queue order: creationTimestamp (1 s), then namespace/name (contract: 0)"),
        ("objects queued", f"{queued} of {n}", ""),
        ("status writes between Queued and Running", f"max {max(between, default=0)}",
         f"total {sum(between)} (contract: 0)"),
        (f"QMP commands to a VM > {args.grace:g}s before its first job", f"{sum(early.values())}",
         f"over {sum(1 for v in early.values() if v)} VMs (contract: 0); all QMP commands {qmp_total}, "
         f"{qmp_total / n:.1f} per object"),
        ("slot freed (dismissed) -> next job created", dist(gaps), f"n={len(gaps)}"),
        ("API writes per object (mean / max)",
         f"{statistics.mean(a + b + c for a, b, c in zip(status_writes, events, meta, strict=True)):.2f} / "
         f"{max(a + b + c for a, b, c in zip(status_writes, events, meta, strict=True))}",
         f"status {statistics.mean(status_writes):.2f}, Events {statistics.mean(events):.2f}, "
         f"metadata {statistics.mean(meta):.2f}"),
        ("agent CPU, ready -> stopped", f"{cpu:.1f} s", f"{1000 * cpu / n:.1f} ms per object"),
        ("agent peak RSS (VmHWM)", f"{peak_mib:.1f} MiB",
         f"target < {TARGET_RSS_MIB:g} MiB: {'met' if peak_mib < TARGET_RSS_MIB else 'MISSED'}"),
        ("wall time, first create -> all done", f"{r.all_done - r.burst_start:.1f} s", ""),
        ("outcome", f"{r.final['Completed']}/{n} Completed",
         f"{r.leftover_jobs} jobs left in QEMU; {r.checked} disks compared, {len(r.problems)} bad"),
    ]  # fmt: skip
    print()
    print(
        f"BlockPull scheduling benchmark: {n} BlockPulls on {args.vms} QEMUs x {args.disks_per_vm} disks, "
        f"one agent, BLOCKPULL_MAX_CONCURRENT={args.limit}; {format_bytes(r.per_pull)} of data per chain "
        f"({format_bytes(args.disk_size)} virtual), unthrottled; {os.cpu_count()} CPUs, load before "
        f"{r.load_before}"
    )
    width = max(len(row[0]) for row in rows)
    for label, value, note in rows:
        print(f"  {label.ljust(width)}  {value}  {note}".rstrip())
    for problem in r.problems[:10]:
        print(f"  PROBLEM: {problem}")
    print(f"  verdict: {'as the contract says' if ok else 'PROBLEMS (see above)'}")
    print(f"rerun: .venv/bin/python benchmarks/bench_scheduling.py {' '.join(sys.argv[1:])}".rstrip())
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--vms", type=int, default=100, help="QEMU processes (default 100)")
    add("--disks-per-vm", type=int, default=10, help="disks per QEMU, one BlockPull each (default 10)")
    add("--limit", type=int, default=8, help="BLOCKPULL_MAX_CONCURRENT (default 8)")
    add("--disk-size", type=parse_bandwidth, default="4Mi", help="virtual size of a disk (default 4Mi)")
    add("--data", type=parse_bandwidth, default="1Mi", help="data written into a chain (default 1Mi)")
    add("--interval", type=float, default=2.0, help="BLOCKPULL_STATUS_INTERVAL (default 2)")
    add("--poll-interval", type=float, default=1.0, help="BLOCKPULL_POLL_INTERVAL (default 1)")
    add(
        "--grace", type=float, default=1.0, help="seconds before a VM's first job in which QMP is the start's"
    )
    add("--agent-env", action="append", default=[], metavar="KEY=VALUE", help="more agent environment")
    add("--timeout", type=float, default=1800.0, help="give up after this many seconds (default 1800)")
    add("--verify-sample", type=int, default=100, help="compare this many disks (default 100; 0: all)")
    add("--agent-log", default="/var/tmp/bench_scheduling-agent.log", help="the agent's log (kept)")
    args = parser.parse_args(argv)
    if not qemu_available():
        parser.error("the QEMU tools are not on PATH (scripts/setup.sh installs them)")
    args.agent_log = Path(args.agent_log).absolute()
    args.agent_log.write_bytes(b"")
    try:
        results = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process stopped and the work directory removed", file=sys.stderr)
        return 130
    return 0 if report(args, results) else 1


if __name__ == "__main__":
    sys.exit(main())
