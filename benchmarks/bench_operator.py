#!/usr/bin/env python3
"""One node agent serving many BlockPulls on many QEMUs: latency, API writes, CPU and memory.

Sets up, all on this machine:

- the Kubernetes API stand-in (`testapiserver`, in this process, recording every request with
  its client's user) with the project's CRD loaded, and one namespace;
- `--vms` QEMUs (`qemu-system-x86_64 -M none`), each with `--disks-per-vm` small qcow2 chains
  attached libvirt-style, a monitor at the agent's socket template path, and a second monitor
  on which a `qemulab.QemuWatcher` records QEMU's job events with QEMU's own timestamps;
- ONE agent, `python -m blockpull.agent`, as its own process (as the DaemonSet runs it), with
  its own user in the stand-in, so its requests can be told apart;
- a watch on blockpulls (official client, in a thread) that notes the local wall-clock time
  at which each object's `.status.phase` is first seen as each phase.

Then it creates one BlockPull per disk, all at once from a thread pool, each throttled to
`--bandwidth` so the jobs run for several seconds, waits until all are Completed (and their
finalizers are gone), and reports:

1. create-to-Running: the create call's return -> the watch first sees phase Running;
2. QEMU-completion-to-Completed: QEMU's BLOCK_JOB_COMPLETED timestamp -> the watch first
   sees phase Completed (QEMU stamps events with the host's wall clock, as `time.time()`);
3. the agent's API writes per object, split into status patches, Events and metadata
   (finalizer) patches, against the budget "transitions + ceil(running seconds / interval)";
4. the agent's CPU time (utime+stime from /proc/PID/stat, all threads) and peak RSS (VmHWM
   from /proc/PID/status, read just before it is stopped);

and checks the outcome: every object Completed, no job left in QEMU, and every disk, after its
QEMU quit, has no backing file and `qemu-img compare` finds it identical to its reference.

Run: `python3 benchmarks/bench_operator.py` (see benchmarks/README.md for the options).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes

from blockpull.quantity import format_bytes, parse_bandwidth
from qemulab import Chain, Disk, QemuVM, QemuWatcher, backing_chain_info, compare, copy_chain, make_chain
from qemulab.tmpdirs import remove_tree, short_tmpdir
from qemulab.tools import qemu_available
from testapiserver import RecordedRequest, ThreadedAPIServer, run_in_thread

GROUP, VERSION, PLURAL = "blockpull.dev", "v1alpha1", "blockpulls"
REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "blockpull.dev_blockpulls.yaml"
NAMESPACE = "bench"
NODE = "bench-node"
AGENT_USER = "agent-bench"
MiB = 1024 * 1024

TARGET_P99_SECONDS = 1.0
TARGET_RSS_MIB = 200.0


# --- one BlockPull ---------------------------------------------------------------------------


@dataclass
class Pull:
    name: str
    vm: str
    disk: str  # spec.disk: the top format node-name
    chain: Chain
    bandwidth: int
    uid: str = ""
    create_start: float = math.nan  # time.time() right before the create call
    create_end: float = math.nan  # ... and right after it returned
    seen: dict[str, float] = field(default_factory=dict)  # phase -> time.time() first seen
    qemu: dict[str, float] = field(default_factory=dict)  # created/completed/concluded -> QEMU time
    qemu_error: str | None = None

    @property
    def job_id(self) -> str:
        return f"blockpull-{self.uid}"

    def manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"nodeName": NODE, "vm": self.vm, "disk": self.disk}
        if self.bandwidth:
            spec["bandwidth"] = self.bandwidth
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BlockPull",
            "metadata": {"name": self.name},
            "spec": spec,
        }


# --- the watch: when is each phase first seen ----------------------------------------------


class PhaseWatch:
    """A watch on the namespace's blockpulls in a thread, noting when phases first appear."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self._client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self._custom = kubernetes.client.CustomObjectsApi(self._client)
        self._watch = kubernetes.watch.Watch()
        self._namespace = namespace
        self._stopping = False
        self.lock = threading.Lock()
        self.first_seen: dict[tuple[str, str], float] = {}
        self.phase: dict[str, str] = {}
        self.events = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._watch.stream(
                self._custom.list_namespaced_custom_object, GROUP, VERSION, self._namespace, PLURAL
            ):
                now = time.time()
                obj = event.get("object")
                if event.get("type") not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(obj, dict):
                    continue
                name = str(obj["metadata"]["name"])
                phase = (obj.get("status") or {}).get("phase")
                with self.lock:
                    self.events += 1
                    if isinstance(phase, str):
                        self.phase[name] = phase
                        self.first_seen.setdefault((name, phase), now)
        except Exception as exc:
            if not self._stopping:
                self.error = exc

    def phases(self) -> Counter[str]:
        with self.lock:
            return Counter(self.phase.values())

    def stop(self) -> None:
        self._stopping = True
        self._watch.stop()
        with contextlib.suppress(Exception):
            self._client.close()


# --- the agent process -----------------------------------------------------------------------


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ProcSample:
    wall: float  # time.time()
    cpu: float  # utime + stime, seconds
    rss_kib: int


class AgentProcess:
    """`python -m blockpull.agent`, with /proc sampled in a thread while it runs."""

    def __init__(self, kubeconfig: Path, socket_dir: Path, log_path: Path, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("BLOCKPULL_", "KUBERNETES_"))},
            "KUBECONFIG": str(kubeconfig),
            "NODE_NAME": NODE,
            "BLOCKPULL_WATCH_NAMESPACE": NAMESPACE,
            "BLOCKPULL_SOCKET_TEMPLATE": f"{socket_dir}/{{namespace}}/{{vm}}.qmp",
            "BLOCKPULL_STATUS_INTERVAL": str(args.interval),
            "BLOCKPULL_POLL_INTERVAL": str(args.poll_interval),
            "BLOCKPULL_LIVENESS_PORT": str(self.port),
            "BLOCKPULL_LOG_LEVEL": args.log_level,
            "PYTHONUNBUFFERED": "1",
        }
        # An installed agent has its bytecode compiled; do not recompile on every start.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        for item in args.agent_env:
            key, _, value = item.partition("=")
            self.env[key] = value
        self.profile: Path | None = Path(args.agent_profile).absolute() if args.agent_profile else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.samples: list[ProcSample] = []
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self._ticks = os.sysconf("SC_CLK_TCK")

    def start(self, timeout: float = 60.0) -> None:
        argv = [sys.executable, "-m", "blockpull.agent"]
        if self.profile is not None:
            argv = [sys.executable, "-m", "cProfile", "-o", str(self.profile), "-m", "blockpull.agent"]
        setpriv = shutil.which("setpriv")
        if setpriv:  # dies with this process even on SIGKILL (setpriv execs: same pid)
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise SystemExit(f"the agent exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the agent was not ready within {timeout:g}s; see {self.log_path}")
            time.sleep(0.05)
        self._sampling.set()
        self._sampler = threading.Thread(target=self._sample_loop, name="bench-agent-proc", daemon=True)
        self._sampler.start()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def sample(self) -> ProcSample:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / self._ticks  # utime, stime (fields 14, 15)
        return ProcSample(time.time(), cpu, self._status_kib("VmRSS"))

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        return 0

    def peak_rss_kib(self) -> int:
        return self._status_kib("VmHWM")

    def _sample_loop(self) -> None:
        while self._sampling.is_set():
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.samples.append(self.sample())
            time.sleep(0.1)

    def cpu_at(self, when: float) -> float:
        """CPU seconds at `when` (the last sample before it, linearly interpolated)."""
        samples = self.samples
        if not samples:
            return math.nan
        if when <= samples[0].wall:
            return samples[0].cpu
        for a, b in itertools.pairwise(samples):
            if a.wall <= when <= b.wall:
                span = b.wall - a.wall
                return a.cpu + (b.cpu - a.cpu) * ((when - a.wall) / span if span else 0.0)
        return samples[-1].cpu

    def stop(self) -> int | None:
        """SIGTERM (as the kubelet does); SIGKILL if it does not stop in 20 s."""
        self._sampling.clear()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# --- numbers ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 100 values is the 99th smallest)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return "   n/a" if math.isnan(seconds) else f"{seconds * 1000:6.0f} ms"


def dist(values: Sequence[float]) -> str:
    if not values:
        return "no samples"
    return (
        f"p50 {ms(percentile(values, 50))}  p99 {ms(percentile(values, 99))}  "
        f"max {ms(max(values))}  (n={len(values)})"
    )


@dataclass
class WriteStats:
    """The agent's write requests, attributed to objects."""

    status: dict[str, list[RecordedRequest]]
    events: dict[str, list[RecordedRequest]]
    finalizers: dict[str, list[RecordedRequest]]
    other_meta: dict[str, list[RecordedRequest]]
    unattributed: list[RecordedRequest]


def split_writes(writes: Iterable[RecordedRequest]) -> WriteStats:
    stats = WriteStats(defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list), [])
    for req in writes:
        body = req.body if isinstance(req.body, dict) else {}
        if req.resource == PLURAL and req.subresource == "status" and req.name:
            stats.status[req.name].append(req)
        elif req.resource == "events" and req.verb == "create":
            involved = body.get("involvedObject") or body.get("regarding") or {}
            name = involved.get("name")
            if name:
                stats.events[str(name)].append(req)
            else:
                stats.unattributed.append(req)
        elif (
            req.resource == PLURAL
            and req.subresource is None
            and req.name
            and req.verb in ("patch", "update")
        ):
            # kopf patches finalizers with a JSON patch (a list of ops), annotations with a
            # merge patch.
            if isinstance(req.body, list):
                paths = [str(op.get("path", "")) for op in req.body if isinstance(op, dict)]
            else:
                paths = [f"/metadata/{key}" for key in (body.get("metadata") or {})]
            if any(path.startswith("/metadata/finalizers") for path in paths):
                stats.finalizers[req.name].append(req)
            else:
                stats.other_meta[req.name].append(req)
        else:
            stats.unattributed.append(req)
    return stats


def status_phase(req: RecordedRequest) -> str | None:
    body = req.body if isinstance(req.body, dict) else {}
    phase = (body.get("status") or {}).get("phase")
    return phase if isinstance(phase, str) else None


@dataclass
class ObjectBudget:
    writes: int
    transitions: int
    running_seconds: float
    budget: int
    early: int  # non-transition writes less than an interval after the object's previous write


def status_budget(requests: list[RecordedRequest], interval: float) -> ObjectBudget:
    ordered = sorted(requests, key=lambda r: r.time)
    transitions = early = 0
    previous_phase: str | None = None
    previous_time: float | None = None
    for req in ordered:
        phase = status_phase(req)
        if phase != previous_phase:
            transitions += 1
        elif previous_time is not None and req.time - previous_time < interval - 0.05:
            early += 1
        previous_phase, previous_time = phase, req.time
    running = ordered[-1].time - ordered[0].time if ordered else 0.0
    budget = transitions + math.ceil(running / interval)
    return ObjectBudget(len(ordered), transitions, running, budget, early)


def dump_requests(path: Path, requests: Iterable[RecordedRequest]) -> None:
    """The agent's requests as JSON lines (time, verb, resource, name, status, body)."""
    with path.open("w") as out:
        for req in requests:
            record = {
                "time": req.time,
                "user": req.user,
                "verb": req.verb,
                "resource": req.resource,
                "subresource": req.subresource,
                "name": req.name,
                "query": req.query,
                "status": req.status,
                "body": req.body,
            }
            out.write(json.dumps(record, default=str) + "\n")


# --- setup -------------------------------------------------------------------------------------


def build_chains(args: argparse.Namespace, workdir: Path) -> list[list[Chain]]:
    """One template chain, then a copy per disk (lower images hard-linked: a full pull writes
    only the top, and QEMU opens the lower ones read-only)."""
    template = make_chain(
        workdir / "template",
        layers=args.layers,
        size=args.disk_size,
        pattern="spread",
        data_bytes=args.data,
        reference="convert",
    )
    jobs = [(v, d) for v in range(args.vms) for d in range(args.disks_per_vm)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        copies = list(
            pool.map(
                lambda vd: copy_chain(template, workdir / f"vm{vd[0]:02d}" / f"d{vd[1]}", link_lower=True),
                jobs,
            )
        )
    return [copies[v * args.disks_per_vm : (v + 1) * args.disks_per_vm] for v in range(args.vms)]


def vm_name(index: int) -> str:
    return f"vm-{index:02d}"


def agent_socket(socket_dir: Path, vm: str) -> Path:
    return socket_dir / NAMESPACE / f"{vm}.qmp"


def copied_bytes(chain: Chain) -> int:
    """What a full pull copies: the data below the top that the top does not cover."""
    from qemulab.patterns import visible_extents  # noqa: PLC0415

    below = visible_extents(chain.pattern[:-1], chain.size)
    top_cover = visible_extents([chain.pattern[-1]], chain.size)
    covered = [(e.offset, e.offset + e.length) for e in top_cover if e.value is not None]
    total = 0
    for extent in below:
        if not extent.value:
            continue
        start, end = extent.offset, extent.offset + extent.length
        overlap = sum(max(0, min(end, b) - max(start, a)) for a, b in covered)
        total += extent.length - overlap
    return total


# --- the benchmark -------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    bandwidth = parse_bandwidth(args.bandwidth)
    workdir = Path(tempfile.mkdtemp(prefix="bpopbench-", dir="/var/tmp"))
    socket_dir = short_tmpdir("bps-")
    agent_log = Path(args.agent_log).absolute()
    agent_log.parent.mkdir(parents=True, exist_ok=True)
    agent_log.write_bytes(b"")
    server: ThreadedAPIServer | None = None
    vms: list[QemuVM] = []
    watchers: list[QemuWatcher] = []
    agent: AgentProcess | None = None
    phase_watch: PhaseWatch | None = None
    admin: Any = None
    loop = asyncio.get_running_loop()
    bench_cpu0 = time.process_time()
    try:
        # --- chains, API, QEMUs ----------------------------------------------------------
        t = time.monotonic()
        chains = build_chains(args, workdir)
        per_job = copied_bytes(chains[0][0])
        print(
            f"built {args.vms * args.disks_per_vm} chains ({args.layers} images, "
            f"{format_bytes(args.disk_size)} virtual, {format_bytes(per_job)} to copy each) "
            f"in {time.monotonic() - t:.1f}s",
            flush=True,
        )
        server = run_in_thread()
        server.load_yaml(CRD)
        server.create_namespace(NAMESPACE)
        admin_kubeconfig = server.write_kubeconfig(workdir / "kubeconfig-admin", user="admin")
        agent_kubeconfig = server.write_kubeconfig(workdir / "kubeconfig-agent", user=AGENT_USER)

        (socket_dir / NAMESPACE).mkdir(parents=True)
        pulls: list[Pull] = []
        for v, vm_chains in enumerate(chains):
            name = vm_name(v)
            sock = agent_socket(socket_dir, name)
            extra = [
                "-chardev",
                f"socket,id=bp,path={sock},server=on,wait=off",
                "-mon",
                "chardev=bp,mode=control",
            ]
            vm = QemuVM([Disk(c) for c in vm_chains], extra_monitors=1, extra_args=extra, ready_timeout=60)
            vms.append(vm)
            for d, chain in enumerate(vm_chains):
                unlimited = len(pulls) < args.unlimited
                pulls.append(
                    Pull(f"pull-{name}-d{d}", name, vm.disks[d].top, chain, 0 if unlimited else bandwidth)
                )
        t = time.monotonic()
        # Started from this (the main) thread: QEMU's pdeathsig follows the starting thread.
        await asyncio.gather(*(vm.start() for vm in vms))
        for vm in vms:
            watcher = QemuWatcher(vm.extra_sockets[0], names=["JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED"])
            watchers.append(await watcher.start())
        print(f"started {len(vms)} QEMUs with {len(pulls)} disks in {time.monotonic() - t:.1f}s", flush=True)

        # --- the watch, then the agent -------------------------------------------------------
        before = server.open_watches
        phase_watch = PhaseWatch(admin_kubeconfig, NAMESPACE)
        phase_watch.start()
        deadline = time.monotonic() + 10
        while server.open_watches <= before:
            if time.monotonic() > deadline:
                raise SystemExit("the benchmark's watch did not open")
            await asyncio.sleep(0.02)
        agent = AgentProcess(agent_kubeconfig, socket_dir, agent_log, args)
        t = time.monotonic()
        await loop.run_in_executor(None, agent.start)
        ready_sample = agent.sample()
        print(
            f"agent pid {agent.pid} ready in {time.monotonic() - t:.1f}s "
            f"(CPU {ready_sample.cpu:.2f}s, RSS {ready_sample.rss_kib / 1024:.0f} MiB); log: {agent_log}",
            flush=True,
        )
        await asyncio.sleep(args.settle)  # let the agent's watch settle before the burst
        writes_before = len(server.requests_by(user=AGENT_USER, writes_only=True))

        # --- create them all -------------------------------------------------------------------
        admin = kubernetes.config.new_client_from_config(config_file=str(admin_kubeconfig))
        custom = kubernetes.client.CustomObjectsApi(admin)

        def create(pull: Pull) -> None:
            pull.create_start = time.time()
            body = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, pull.manifest())
            pull.create_end = time.time()
            pull.uid = str(body["metadata"]["uid"])

        # Interleave the VMs, so that each VM's disks are not created back to back.
        order = sorted(pulls, key=lambda p: (p.name.rsplit("-d", 1)[1], p.vm))
        burst_start = time.time()
        with ThreadPoolExecutor(max_workers=args.create_threads) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, create, p) for p in order))
        burst_end = time.time()
        print(f"created {len(pulls)} BlockPulls in {burst_end - burst_start:.2f}s", flush=True)

        # --- wait for the outcome ----------------------------------------------------------------
        expected = per_job / bandwidth if bandwidth else 1.0
        timeout = args.timeout or max(120.0, 10 * expected)
        deadline = time.monotonic() + timeout
        next_print = time.monotonic() + 5
        while True:
            phases = phase_watch.phases()
            done = phases["Completed"] + phases["Failed"]
            if done >= len(pulls):
                break
            if phase_watch.error is not None:
                raise SystemExit(f"the benchmark's watch failed: {phase_watch.error!r}")
            if agent.proc is not None and agent.proc.poll() is not None:
                raise SystemExit(f"the agent exited with {agent.proc.returncode}; see {agent_log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"not all BlockPulls finished within {timeout:g}s: {dict(phases)}")
            if time.monotonic() >= next_print:
                print(f"  {time.time() - burst_start:5.1f}s: {dict(sorted(phases.items()))}", flush=True)
                next_print += 5
            await asyncio.sleep(0.1)
        all_done = time.time()
        print(f"all finished {all_done - burst_start:.1f}s after the first create", flush=True)

        # The finalizers come off after the outcome; wait for that, then a quiet period in
        # which nothing should be written any more.
        deadline = time.monotonic() + 30
        while any(
            (obj.get("metadata") or {}).get("finalizers")
            for obj in server.objects(GROUP, VERSION, PLURAL, NAMESPACE)
        ):
            if time.monotonic() > deadline:
                print("  WARNING: finalizers still present 30s after completion", flush=True)
                break
            await asyncio.sleep(0.1)
        finalizers_gone = time.time()
        await asyncio.sleep(args.quiet)
        end_sample = agent.sample()
        peak_kib = agent.peak_rss_kib()
        agent_exit = agent.stop()
        bench_cpu = time.process_time() - bench_cpu0

        # --- QEMU's side ----------------------------------------------------------------------
        by_vm: dict[str, list[Pull]] = defaultdict(list)
        for pull in pulls:
            by_vm[pull.vm].append(pull)
        leftover_jobs = 0
        for index, (vm, watcher) in enumerate(zip(vms, watchers, strict=True)):
            for pull in by_vm[vm_name(index)]:
                for ev in watcher.events(job_id=pull.job_id):
                    if ev.qemu_time is None:
                        continue
                    if ev.name == "BLOCK_JOB_COMPLETED":
                        pull.qemu.setdefault("completed", ev.qemu_time)
                        if ev.data.get("error"):
                            pull.qemu_error = str(ev.data["error"])
                    elif ev.data.get("status") in ("created", "concluded"):
                        pull.qemu.setdefault(str(ev.data["status"]), ev.qemu_time)
            jobs = await vm.execute("query-jobs")
            leftover_jobs += len(jobs) if isinstance(jobs, list) else 0
            await watcher.stop()
        watchers.clear()
        with phase_watch.lock:
            for pull in pulls:
                for (name, phase), when in phase_watch.first_seen.items():
                    if name == pull.name:
                        pull.seen[phase] = when
            watch_events = phase_watch.events
            final_phase = dict(phase_watch.phase)
        phase_watch.stop()
        # Quit every QEMU (a clean quit flushes), then look at the images themselves.
        await asyncio.gather(*(vm.stop() for vm in vms))
        sample = pulls if args.verify_sample <= 0 else pulls[:: max(1, len(pulls) // args.verify_sample)]

        def verify(pull: Pull) -> str | None:
            info = backing_chain_info(pull.chain.top)
            if info[0].backing_filename is not None:
                return f"{pull.name}: {pull.chain.top} still has backing file {info[0].backing_filename}"
            assert pull.chain.reference is not None
            if not compare(pull.chain.top, pull.chain.reference):
                return f"{pull.name}: {pull.chain.top} differs from its reference"
            return None

        with ThreadPoolExecutor(max_workers=4) as pool:
            problems = [p for p in pool.map(verify, sample) if p]

        # --- the agent's API requests --------------------------------------------------------------
        agent_requests = server.requests_by(user=AGENT_USER)
        agent_writes = [r for r in agent_requests if r.is_write]
        stats = split_writes(agent_writes[writes_before:] if writes_before else agent_writes)
        reads = Counter(r.verb for r in agent_requests if not r.is_write and r.is_resource_request)
        if args.dump_requests:
            dump_requests(Path(args.dump_requests), server.requests)
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
        if admin is not None:
            admin.close()
        if server is not None:
            server.stop()
        remove_tree(socket_dir)
        if not args.keep:
            remove_tree(workdir)

    # --- report ----------------------------------------------------------------------------------
    names = [p.name for p in pulls]
    to_running = [p.seen["Running"] - p.create_end for p in pulls if "Running" in p.seen]
    to_completed = [
        p.seen["Completed"] - p.qemu["completed"]
        for p in pulls
        if "Completed" in p.seen and "completed" in p.qemu
    ]
    create_calls = [p.create_end - p.create_start for p in pulls]
    to_qemu_created = [p.qemu["created"] - p.create_end for p in pulls if "created" in p.qemu]
    created_to_running = [
        p.seen["Running"] - p.qemu["created"] for p in pulls if "created" in p.qemu and "Running" in p.seen
    ]
    job_times = [
        p.qemu["completed"] - p.qemu["created"] for p in pulls if {"created", "completed"} <= set(p.qemu)
    ]
    completed_patch = {
        n: next((r.time for r in stats.status.get(n, []) if status_phase(r) == "Completed"), math.nan)
        for n in names
    }
    qemu_to_patch = [completed_patch[p.name] - p.qemu["completed"] for p in pulls if "completed" in p.qemu]
    qemu_to_patch = [x for x in qemu_to_patch if not math.isnan(x)]
    patch_to_seen = [p.seen["Completed"] - completed_patch[p.name] for p in pulls if "Completed" in p.seen]
    patch_to_seen = [x for x in patch_to_seen if not math.isnan(x)]

    budgets = {n: status_budget(stats.status.get(n, []), args.interval) for n in names}
    over = [n for n, b in budgets.items() if b.writes > b.budget]
    early = sum(b.early for b in budgets.values())
    per_obj_status = [len(stats.status.get(n, [])) for n in names]
    per_obj_events = [len(stats.events.get(n, [])) for n in names]
    per_obj_final = [len(stats.finalizers.get(n, [])) for n in names]
    per_obj_meta = [len(stats.other_meta.get(n, [])) for n in names]
    per_obj_all = [
        a + b + c + d
        for a, b, c, d in zip(per_obj_status, per_obj_events, per_obj_final, per_obj_meta, strict=True)
    ]
    transitions = [b.transitions for b in budgets.values()]
    progress_writes = [b.writes - b.transitions for b in budgets.values()]
    running_secs = [b.running_seconds for b in budgets.values()]
    total_writes = sum(per_obj_all) + len(stats.unattributed)
    event_reasons = Counter(
        str((r.body or {}).get("reason"))
        for reqs in stats.events.values()
        for r in reqs
        if isinstance(r.body, dict)
    )
    transition_kinds = Counter(
        " -> ".join(p or "?" for p in [status_phase(r) for r in sorted(reqs, key=lambda r: r.time)])
        for reqs in stats.status.values()
    )

    all_running = max((p.seen.get("Running", math.nan) for p in pulls), default=math.nan)
    first_completed = min((p.seen.get("Completed", math.inf) for p in pulls), default=math.nan)
    segments = [
        ("agent start -> ready", None, None),
        ("burst: first create -> all Running", burst_start, all_running),
        ("streaming: all Running -> first Completed", all_running, first_completed),
        ("finishing: first Completed -> finalizers gone", first_completed, finalizers_gone),
        ("idle afterwards (--quiet)", finalizers_gone, end_sample.wall),
    ]
    completed = sum(1 for n in names if final_phase.get(n) == "Completed")
    peak_mib = peak_kib / 1024
    run_cpu = end_sample.cpu - ready_sample.cpu
    run_wall = end_sample.wall - ready_sample.wall

    p99_running = percentile(to_running, 99)
    p99_completed = percentile(to_completed, 99)
    ok_running = len(to_running) == len(pulls) and p99_running < TARGET_P99_SECONDS
    ok_completed = len(to_completed) == len(pulls) and p99_completed < TARGET_P99_SECONDS
    ok_writes = not over
    ok_rss = peak_mib < TARGET_RSS_MIB
    ok_outcome = completed == len(pulls) and not problems and leftover_jobs == 0

    print()
    print(
        f"BlockPull agent benchmark: {len(pulls)} BlockPulls on {len(vms)} QEMUs x {args.disks_per_vm} disks, "
        f"one agent; {args.layers}-image chains of {format_bytes(args.disk_size)}, "
        f"{format_bytes(per_job)} copied per pull at "
        f"{'unlimited' if not bandwidth else format_bytes(bandwidth) + '/s'}"
        f"{f' ({args.unlimited} unlimited)' if args.unlimited else ''}; "
        f"status interval {args.interval:g}s, poll interval {args.poll_interval:g}s; {os.cpu_count()} CPUs"
    )
    verdict = {True: "met", False: "MISSED"}
    rows: list[tuple[str, str, str]] = [
        (
            "create -> Running (create returned -> watch sees it)",
            dist(to_running),
            f"p99 < {TARGET_P99_SECONDS:g} s: {verdict[ok_running]}",
        ),
        (
            "QEMU completion -> Completed (BLOCK_JOB_COMPLETED -> watch)",
            dist(to_completed),
            f"p99 < {TARGET_P99_SECONDS:g} s: {verdict[ok_completed]}",
        ),
        ("  create call itself", dist(create_calls), ""),
        (
            "  create returned -> QEMU job created",
            dist(to_qemu_created),
            "agent: watch, kopf, QMP, block-stream",
        ),
        (
            "  QEMU job created -> watch sees Running",
            dist(created_to_running),
            "status patch + watch delivery",
        ),
        (
            "  BLOCK_JOB_COMPLETED -> Completed patch received",
            dist(qemu_to_patch),
            "agent: event, query, patch",
        ),
        ("  Completed patch received -> watch sees it", dist(patch_to_seen), "stand-in + watch delivery"),
        ("  job in QEMU, created -> BLOCK_JOB_COMPLETED", dist(job_times), ""),
        (
            "API writes per object, all (mean / max)",
            f"{statistics.mean(per_obj_all):.2f} / {max(per_obj_all)}",
            f"{total_writes} writes by {AGENT_USER}, {len(stats.unattributed)} not about an object",
        ),
        (
            "  status patches (mean / max)",
            f"{statistics.mean(per_obj_status):.2f} / {max(per_obj_status)}",
            f"transitions {statistics.mean(transitions):.2f}, other {statistics.mean(progress_writes):.2f} per object",
        ),
        (
            "  Events posted (mean / max)",
            f"{statistics.mean(per_obj_events):.2f} / {max(per_obj_events)}",
            ", ".join(f"{k} {v}" for k, v in sorted(event_reasons.items())),
        ),
        (
            "  finalizer patches (mean / max)",
            f"{statistics.mean(per_obj_final):.2f} / {max(per_obj_final)}",
            "",
        ),
        (
            "  other metadata patches (mean / max)",
            f"{statistics.mean(per_obj_meta):.2f} / {max(per_obj_meta)}",
            "",
        ),
        (
            "status writes over budget (transitions + ceil(running s / interval))",
            f"{len(over)} of {len(pulls)} objects",
            f"running p50 {statistics.median(running_secs):.1f}s; at most 1 per interval + transitions: {verdict[ok_writes]}",
        ),
        ("  non-transition status writes < 1 interval after the previous", f"{early} in all", ""),
        (
            "agent CPU, whole run (ready -> stop)",
            f"{run_cpu:7.2f} s",
            f"{100 * run_cpu / run_wall:.1f}% of one core over {run_wall:.1f}s; start-up {ready_sample.cpu:.2f}s more",
        ),
    ]
    for label, start, end in segments[1:]:
        if start is None or end is None or math.isnan(start) or math.isnan(end) or end <= start:
            continue
        assert agent is not None
        cpu = agent.cpu_at(end) - agent.cpu_at(start)
        rows.append(
            (
                f"  {label}",
                f"{cpu:7.2f} s",
                f"{100 * cpu / (end - start):.1f}% of a core over {end - start:.1f}s",
            )
        )
    rows += [
        ("agent peak RSS (VmHWM)", f"{peak_mib:7.1f} MiB",
         f"< {TARGET_RSS_MIB:g} MiB: {verdict[ok_rss]}; at ready {ready_sample.rss_kib / 1024:.0f}, at end {end_sample.rss_kib / 1024:.0f}"),
        ("agent reads (verb: count)", ", ".join(f"{k}: {v}" for k, v in sorted(reads.items())), ""),
        ("benchmark process CPU (stand-in, watches, setup)", f"{bench_cpu:7.2f} s", ""),
        ("outcome", f"{completed}/{len(pulls)} Completed",
         f"{leftover_jobs} jobs left in QEMU; {len(sample)} disks checked, {len(problems)} problems: "
         f"{verdict[ok_outcome]}"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"  {label.ljust(width)}  {value}  {note}".rstrip())
    print(f"  status write sequences: {dict(transition_kinds.most_common(4))}")
    print(f"  watch events seen: {watch_events}; agent exit status {agent_exit}; agent log: {agent_log}")
    for problem in problems[:10]:
        print(f"  PROBLEM: {problem}")
    for pull in pulls:
        if pull.qemu_error:
            print(f"  PROBLEM: {pull.name}: QEMU job error {pull.qemu_error}")
    met = ok_running and ok_completed and ok_writes and ok_rss and ok_outcome
    print(f"  verdict: {'all targets met' if met else 'targets MISSED (see above)'}")
    print(f"rerun: python3 benchmarks/bench_operator.py {' '.join(sys.argv[1:])}".rstrip())
    return 0 if ok_outcome else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--vms", type=int, default=20, help="QEMU processes (default 20)")
    add("--disks-per-vm", type=int, default=5, help="disks per QEMU, one BlockPull each (default 5)")
    add("--layers", type=int, default=3, help="images per chain (default 3)")
    add("--disk-size", type=parse_bandwidth, default="32Mi", help="virtual size of each disk (default 32Mi)")
    add("--data", type=parse_bandwidth, default="8Mi", help="data written into each chain (default 8Mi)")
    add("--bandwidth", default="1Mi", help="spec.bandwidth of each BlockPull, bytes/s (default 1Mi; 0: none)")
    add("--unlimited", type=int, default=0, help="this many BlockPulls get no bandwidth limit (default 0)")
    add(
        "--interval",
        type=float,
        default=2.0,
        help="BLOCKPULL_STATUS_INTERVAL (default 2, the agent's default)",
    )
    add(
        "--poll-interval",
        type=float,
        default=1.0,
        help="BLOCKPULL_POLL_INTERVAL (default 1, the agent's default)",
    )
    add("--log-level", default="INFO", help="BLOCKPULL_LOG_LEVEL of the agent (default INFO)")
    add("--create-threads", type=int, default=8, help="threads creating the BlockPulls (default 8)")
    add("--settle", type=float, default=1.0, help="seconds between agent ready and the burst (default 1)")
    add("--quiet", type=float, default=2.0, help="seconds watched after the finalizers are gone (default 2)")
    add("--timeout", type=float, default=0.0, help="give up after this many seconds (default: from the rate)")
    add("--verify-sample", type=int, default=0, help="qemu-img compare this many disks (default 0: all)")
    add("--agent-log", default="/var/tmp/bench_operator-agent.log", help="where the agent's log is kept")
    add("--agent-env", action="append", default=[], metavar="KEY=VALUE", help="more agent environment")
    add("--agent-profile", metavar="FILE", help="run the agent under cProfile, writing FILE at its exit")
    add("--dump-requests", help="write the agent's requests to this file as JSON lines")
    add("--keep", action="store_true", help="keep the work directory (chains, kubeconfigs)")
    args = parser.parse_args(argv)
    if args.vms < 1 or args.disks_per_vm < 1:
        parser.error("--vms and --disks-per-vm must be at least 1")
    if not qemu_available():
        parser.error("QEMU tools are not on PATH (scripts/setup.sh installs them)")
    # SIGTERM cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted; everything was stopped and removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
