#!/usr/bin/env python3
"""One node agent serving many BlockPulls on many QEMUs: latency, API writes, CPU and memory.

Sets up, all on this machine:

- the Kubernetes API stand-in (`testapiserver`, in a process of its own, recording every
  request with its client's user) with the project's CRD and one namespace; first it is timed
  alone (status patches per second from as many threads as the agent uses);
- `--vms` QEMUs (`qemu-system-x86_64 -M none`), each with `--disks-per-vm` small qcow2 chains
  attached libvirt-style, a monitor at the agent's socket template path, and a second monitor
  on which a `qemulab.QemuWatcher` records QEMU's job events with QEMU's own timestamps;
- ONE agent, `python -m blockpull.agent`, as its own process (the way the DaemonSet runs it),
  with a user of its own in the stand-in so that its requests can be told apart;
- a watch on blockpulls (official client, in a thread) that notes the wall-clock time at which
  each object's `.status.phase` is first seen as each phase.

Then it creates one BlockPull per disk, all at once from a thread pool, each throttled to
`--bandwidth` so that the jobs run for several seconds, waits until all are Completed and their
finalizers are gone, and reports:

1. create-to-Running: the create call returned -> the watch first sees phase Running;
2. QEMU-completion-to-Completed: the job's copy done (JOB_STATUS_CHANGE `pending`, else
   BLOCK_JOB_COMPLETED) -> the watch first sees
   phase Completed (QEMU stamps its events with the host's wall clock, comparable with
   `time.time()`);
3. the agent's API writes per object: status patches, Events, finalizer patches and other
   metadata patches, and the status writes against the budget
   "transitions + ceil(seconds from first to last status write / interval)";
4. the agent's CPU time (utime+stime of all its threads, /proc/PID/stat) and peak RSS
   (VmHWM, /proc/PID/status, read just before it is stopped);

and checks the outcome: every object Completed, no job left in any QEMU, and every disk, once
its QEMU has quit, has no backing file and is identical to its reference (`qemu-img compare`).

The VMs are behind an interface (`VMs`; `QmpVMs` here): `bench_operator_libvirt.py` runs the
same benchmark, numbers and report on libvirt domains.

Run: `.venv/bin/python benchmarks/bench_operator.py` (see benchmarks/README.md for the options).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import math
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import kubernetes

from blockpull.quantity import format_bytes, parse_bandwidth
from qemulab import Chain, Disk, QemuVM, QemuWatcher, backing_chain_info, compare, copy_chain, make_chain
from qemulab.patterns import visible_extents
from qemulab.tmpdirs import remove_tree, short_tmpdir
from qemulab.tools import qemu_available
from testapiserver import RecordedRequest, run_in_thread
from testapiserver import handlers as stand_in_handlers

GROUP, VERSION, PLURAL = "blockpull.dev", "v1alpha1", "blockpulls"
REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "blockpull.dev_blockpulls.yaml"
NAMESPACE = "bench"
NODE = "bench-node"
AGENT_USER = "agent-bench"

#: The agent makes its API calls through asyncio's default thread pool: min(32, CPUs + 4) threads.
AGENT_POOL = min(32, (os.cpu_count() or 1) + 4)

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
    qemu: dict[str, float] = field(default_factory=dict)  # created/completed -> QEMU's timestamp
    qemu_error: str | None = None
    jobs_started: int = 0  # QEMU `created` events for this object's job id

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


# --- the watch: when each phase is first seen --------------------------------------------------


class PhaseWatch:
    """A watch on the namespace's blockpulls in a thread, noting when phases first appear."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self._client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig)
        )
        self._custom = kubernetes.client.CustomObjectsApi(self._client)
        self._watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        self._namespace = namespace
        self._stopping = False
        self.lock = threading.Lock()
        self.first_seen: dict[str, dict[str, float]] = defaultdict(dict)
        self.phase: dict[str, str] = {}
        self.events = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            stream = self._watch.stream(  # type: ignore[no-untyped-call]
                self._custom.list_namespaced_custom_object, GROUP, VERSION, self._namespace, PLURAL
            )
            for event in stream:
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
                        self.first_seen[name].setdefault(phase, now)
        except Exception as exc:
            if not self._stopping:
                self.error = exc

    def phases(self) -> Counter[str]:
        with self.lock:
            return Counter(self.phase.values())

    def stop(self) -> None:
        self._stopping = True
        self._watch.stop()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            self._client.close()


# --- the agent process -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    wall: float  # time.time()
    cpu: float  # utime + stime of all threads, seconds
    rss_kib: int


def machine_busy_seconds() -> float:
    """CPU seconds spent on anything but idle and iowait since boot, all CPUs (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """CPU seconds of groups of processes, and of the whole machine, every 0.1 s in a thread."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._running = threading.Event()

    def sample(self) -> dict[str, float]:
        values = {"machine": machine_busy_seconds()}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += proc_cpu_seconds(pid)
            values[name] = total
        return values

    def start(self) -> None:
        self._running.set()
        threading.Thread(target=self._loop, name="bench-cpu", daemon=True).start()

    def _loop(self) -> None:
        while self._running.is_set():
            self.samples.append((time.time(), self.sample()))
            time.sleep(0.1)

    def stop(self) -> None:
        self._running.clear()

    def at(self, key: str, when: float) -> float:
        """CPU seconds of `key` at `when`, interpolated between the samples around it."""
        samples = self.samples
        if not samples:
            return math.nan
        if when <= samples[0][0]:
            return samples[0][1][key]
        for (ta, a), (tb, b) in itertools.pairwise(samples):
            if ta <= when <= tb:
                share = (when - ta) / (tb - ta) if tb > ta else 0.0
                return a[key] + (b[key] - a[key]) * share
        return samples[-1][1][key]

    def between(self, key: str, start: float, end: float) -> float:
        return self.at(key, end) - self.at(key, start)


class AgentProcess:
    """`python -m blockpull.agent`, its /proc sampled every 0.1 s while it runs."""

    def __init__(
        self,
        kubeconfig: Path,
        socket_dir: Path,
        log_path: Path,
        args: argparse.Namespace,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
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
            "BLOCKPULL_METRICS_PORT": str(self.metrics_port),
            "BLOCKPULL_LOG_LEVEL": args.log_level,
            # No node slot limit unless --agent-env sets one: every object starts at once, as
            # before the scheduler (benchmarks/bench_scheduling.py measures the queue).
            "BLOCKPULL_MAX_CONCURRENT": "0",
            "PYTHONUNBUFFERED": "1",
        }
        # An installed agent has its bytecode compiled; do not recompile it on every start.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env.update(extra_env or {})
        for item in args.agent_env:
            key, _, value = item.partition("=")
            self.env[key] = value
        self.argv = [sys.executable, "-m", "blockpull.agent"]
        if args.agent_profile:
            profile = str(Path(args.agent_profile).absolute())
            self.argv = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "blockpull.agent"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        argv = list(self.argv)
        setpriv = shutil.which("setpriv")
        if setpriv:  # ends with this process even if it is killed (setpriv execs: same pid)
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

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def sample(self) -> ProcSample:
        return ProcSample(time.time(), proc_cpu_seconds(self.pid), self._status_kib("VmRSS"))

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        return 0

    def peak_rss_kib(self) -> int:
        return self._status_kib("VmHWM")

    def stop(self) -> int | None:
        """SIGTERM (as the kubelet does); SIGKILL if it has not stopped within 20 s."""
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


# --- the API stand-in, in its own process (or a thread of this one) ------------------------


def _request_kind(method: str, path: str) -> str:
    if path.endswith("/status"):
        return f"{method} {PLURAL}/status"
    for kind in (PLURAL, "events"):
        if f"/{kind}" in path:
            return f"{method} {kind}"
    return f"{method} other"


class _StandInHost:
    """The stand-in plus two probes, living where it runs (a child process or this process).

    - service times: every non-watch request, from the stand-in's entry point until its answer
      is ready, by kind (`PATCH blockpulls/status`...). The entry point is wrapped for as long
      as the host lives; the stand-in itself is not changed.
    - loop lag: how late a 10 ms timer on the stand-in's event loop fires, i.e. how long a
      request that has arrived may wait before the stand-in even looks at it.
    """

    def __init__(self) -> None:
        self.service: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (time.time(), seconds)
        self.lag: list[tuple[float, float]] = []  # (time.time(), seconds late)
        self._original = stand_in_handlers.Handlers.handle
        service = self.service
        original = self._original

        async def timed(self: stand_in_handlers.Handlers, request: Any) -> Any:
            start = time.perf_counter()
            try:
                return await original(self, request)
            finally:
                if request.query.get("watch") not in ("true", "1") and "/watch/" not in request.path:
                    kind = _request_kind(request.method, request.path)
                    service[kind].append((time.time(), time.perf_counter() - start))

        setattr(stand_in_handlers.Handlers, "handle", timed)  # noqa: B010 - a method, on purpose
        self.server = run_in_thread()
        self._probe_task: asyncio.Future[None] = self.server.call(
            lambda: asyncio.ensure_future(self._probe())
        )

    async def _probe(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lag.append((time.time(), time.perf_counter() - start - 0.01))

    def handle(self, command: str, args: tuple[Any, ...]) -> Any:
        server = self.server
        if command == "url":
            return server.url
        if command == "write_kubeconfig":
            return server.write_kubeconfig(*args)
        if command == "load_yaml":
            return server.load_yaml(*args)
        if command == "create_namespace":
            return server.create_namespace(*args)
        if command == "open_watches":
            return server.open_watches
        if command == "objects":
            return server.objects(*args)
        if command == "requests":
            return server.requests
        if command == "probes":
            return {k: list(v) for k, v in self.service.items()}, list(self.lag)
        raise ValueError(f"unknown command {command!r}")

    def stop(self) -> None:
        self.server.call(self._probe_task.cancel)
        self.server.stop()
        setattr(stand_in_handlers.Handlers, "handle", self._original)  # noqa: B010


def _stand_in_process(conn: Connection) -> None:
    """The child process: serve the stand-in until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    with contextlib.suppress(Exception):  # die with the parent, however it ends (Linux)
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    host = _StandInHost()
    try:
        while True:
            try:
                command, args = conn.recv()
            except (EOFError, OSError):
                return
            if command == "stop":
                return
            try:
                conn.send((True, host.handle(command, args)))
            except Exception as exc:
                conn.send((False, f"{type(exc).__name__}: {exc}"))
    finally:
        host.stop()
        conn.close()


class StandIn:
    """The Kubernetes API stand-in with the CRD loaded, in its own process by default.

    In its own process it has its own interpreter lock, so the benchmark's watch and creating
    threads do not slow it down (nor it them); `in_process=True` runs it in a thread of this
    process, the way the operator tests do.
    """

    def __init__(self, *, in_process: bool) -> None:
        self._host: _StandInHost | None = None
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._lock = threading.Lock()
        if in_process:
            self._host = _StandInHost()
        else:
            context = multiprocessing.get_context("spawn")
            self._conn, child = context.Pipe()
            self._proc = context.Process(
                target=_stand_in_process, args=(child,), name="stand-in", daemon=True
            )
            self._proc.start()
            child.close()
        self.url: str = self._call("url")
        self._call("load_yaml", CRD)
        self._call("create_namespace", NAMESPACE)

    def _call(self, command: str, *args: Any) -> Any:
        if self._host is not None:
            return self._host.handle(command, args)
        assert self._conn is not None
        with self._lock:
            self._conn.send((command, args))
            ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"stand-in: {command}: {value}")
        return value

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None and self._proc.pid else os.getpid()

    def write_kubeconfig(self, path: Path, user: str) -> Path:
        return Path(self._call("write_kubeconfig", path, user))

    def open_watches(self) -> int:
        return int(self._call("open_watches"))

    def objects(self) -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = self._call("objects", GROUP, VERSION, PLURAL, NAMESPACE)
        return objects

    def requests(self) -> list[RecordedRequest]:
        requests: list[RecordedRequest] = self._call("requests")
        return requests

    def probes(self) -> tuple[dict[str, list[tuple[float, float]]], list[tuple[float, float]]]:
        service, lag = self._call("probes")
        return service, lag

    def stop(self) -> None:
        if self._host is not None:
            self._host.stop()
            self._host = None
        if self._proc is not None and self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("stop", ()))
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._conn.close()
            self._proc = None


# --- numbers -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: p99 of 100 values is the 99th smallest."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def ms(seconds: float) -> str:
    return "    n/a" if math.isnan(seconds) else f"{seconds * 1000:5.0f} ms"


def dist(values: Sequence[float]) -> str:
    if not values:
        return "no samples"
    return f"p50 {ms(percentile(values, 50))}  p99 {ms(percentile(values, 99))}  max {ms(max(values))}"


def deltas(pairs: Iterable[tuple[float | None, float | None]]) -> list[float]:
    """end - start for every pair where both are known."""
    return [b - a for a, b in pairs if a is not None and b is not None and not math.isnan(a + b)]


def body_of(req: RecordedRequest) -> dict[str, Any]:
    return req.body if isinstance(req.body, dict) else {}


def status_phase(req: RecordedRequest) -> str | None:
    phase = (body_of(req).get("status") or {}).get("phase")
    return phase if isinstance(phase, str) else None


@dataclass
class Writes:
    """The agent's write requests, attributed to the objects they are about."""

    status: dict[str, list[RecordedRequest]] = field(default_factory=lambda: defaultdict(list))
    events: dict[str, list[RecordedRequest]] = field(default_factory=lambda: defaultdict(list))
    finalizers: dict[str, list[RecordedRequest]] = field(default_factory=lambda: defaultdict(list))
    other_meta: dict[str, list[RecordedRequest]] = field(default_factory=lambda: defaultdict(list))
    unattributed: list[RecordedRequest] = field(default_factory=list)

    @classmethod
    def split(cls, writes: Iterable[RecordedRequest]) -> Writes:
        out = cls()
        for req in writes:
            if req.resource == PLURAL and req.subresource == "status" and req.name:
                out.status[req.name].append(req)
            elif req.resource == "events" and req.verb == "create":
                involved = body_of(req).get("involvedObject") or body_of(req).get("regarding") or {}
                if involved.get("name"):
                    out.events[str(involved["name"])].append(req)
                else:
                    out.unattributed.append(req)
            elif (
                req.resource == PLURAL
                and not req.subresource
                and req.name
                and req.verb in ("patch", "update")
            ):
                # kopf changes finalizers with a JSON patch (a list of operations), its
                # annotations with a merge patch.
                if isinstance(req.body, list):
                    paths = [str(op.get("path", "")) for op in req.body if isinstance(op, dict)]
                else:
                    paths = [f"/metadata/{key}" for key in body_of(req).get("metadata") or {}]
                if any(path.startswith("/metadata/finalizers") for path in paths):
                    out.finalizers[req.name].append(req)
                else:
                    out.other_meta[req.name].append(req)
            else:
                out.unattributed.append(req)
        return out

    def first_status(self, name: str, phase: str) -> float | None:
        return next((r.time for r in self.status.get(name, []) if status_phase(r) == phase), None)

    def first_any_status(self, name: str) -> float | None:
        """When the object first got a status: the first status write the API took."""
        taken = (r.time for r in self.status.get(name, []) if r.status is not None and r.status < 300)
        return next(taken, None)

    def first_finalizer(self, name: str) -> float | None:
        requests = self.finalizers.get(name, [])
        return requests[0].time if requests else None


@dataclass(frozen=True)
class StatusBudget:
    writes: int
    transitions: int  # writes whose phase differs from the previous write's (the first counts)
    span: float  # seconds from the first to the last status write
    budget: int  # transitions + ceil(span / interval)
    early: int  # same-phase writes less than an interval after the object's previous write
    writes_after_outcome: int  # status writes after the first Completed/Failed one
    sequence: str  # e.g. "Running x5 -> Completed"


def status_budget(requests: list[RecordedRequest], interval: float) -> StatusBudget:
    ordered = sorted(requests, key=lambda r: r.time)
    phases = [status_phase(r) or "?" for r in ordered]
    transitions = early = 0
    for i, req in enumerate(ordered):
        if i == 0 or phases[i] != phases[i - 1]:
            transitions += 1
        elif req.time - ordered[i - 1].time < interval - 0.05:
            early += 1
    span = ordered[-1].time - ordered[0].time if ordered else 0.0
    outcome = next((i for i, phase in enumerate(phases) if phase in ("Completed", "Failed")), None)
    after_outcome = 0 if outcome is None else len(phases) - outcome - 1
    runs = [(phase, len(list(group))) for phase, group in itertools.groupby(phases)]
    sequence = " -> ".join(phase if n == 1 else f"{phase} x{n}" for phase, n in runs)
    budget = transitions + math.ceil(span / interval)
    return StatusBudget(len(ordered), transitions, span, budget, early, after_outcome, sequence)


def dump_requests(path: Path, requests: Iterable[RecordedRequest]) -> None:
    """Every request the stand-in recorded, as JSON lines."""
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


def calibrate_api(kubeconfig: Path, *, threads: int, writes: int = 300) -> tuple[float, list[float]]:
    """Status patches per second the stand-in absorbs from `threads` client threads (the size of
    the agent's default asyncio pool on this machine), with bodies like the agent's, and their
    latencies as the client sees them. On objects of another namespace and node."""
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    try:
        custom = kubernetes.client.CustomObjectsApi(client)
        namespace = kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name="calibrate"))
        kubernetes.client.CoreV1Api(client).create_namespace(namespace)
        names = [f"calibrate-{i}" for i in range(20)]
        for name in names:
            manifest = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "BlockPull",
                "metadata": {"name": name},
                "spec": {"nodeName": "calibrate-node", "vm": "vm", "disk": "disk"},
            }
            custom.create_namespaced_custom_object(GROUP, VERSION, "calibrate", PLURAL, manifest)
        condition = {
            "status": "False",
            "reason": "Running",
            "message": "phase is Running",
            "observedGeneration": 1,
        }
        status = {
            "phase": "Running",
            "reason": "Streaming",
            "message": "streamed 13.5 MiB of 32.0 MiB",
            "observedGeneration": 1,
            "nodeName": "calibrate-node",
            "jobId": "blockpull-00000000-0000-0000-0000-000000000000",
            "target": {"node": "disk0-fmt2"},
            "chain": [
                {"node": f"disk0-fmt{i}", "file": f"/var/tmp/bpopbench-xxxxxxxx/vm00/d0/l{i}.qcow2"}
                for i in range(3)
            ],
            "offset": 14155776,
            "length": 33554432,
            "progress": "42.18%",
            "bandwidth": 1048576,
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [
                {**condition, "type": kind, "lastTransitionTime": "2026-01-01T00:00:00Z"}
                for kind in ("Running", "Completed", "Failed")
            ],
        }

        def patch(i: int) -> float:
            start = time.perf_counter()
            custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                "calibrate",
                PLURAL,
                names[i % len(names)],
                {"status": {**status, "offset": i}},
            )
            return time.perf_counter() - start

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(patch, range(threads * 4)))  # warm: connections, first requests
            start = time.perf_counter()
            latencies = list(pool.map(patch, range(writes)))
            seconds = time.perf_counter() - start
        return writes / seconds, latencies
    finally:
        client.close()


# --- setup -----------------------------------------------------------------------------------------


def vm_name(index: int) -> str:
    return f"vm-{index:02d}"


def build_chains(args: argparse.Namespace, workdir: Path) -> list[list[Chain]]:
    """One template chain, then a copy per disk. The lower images are hard-linked: a full pull
    writes only the top, and QEMU opens the lower ones read-only."""
    template = make_chain(
        workdir / "template",
        layers=args.layers,
        size=args.disk_size,
        pattern="spread",
        data_bytes=args.data,
        reference="convert",
    )

    def copy(vd: tuple[int, int]) -> Chain:
        return copy_chain(template, workdir / f"vm{vd[0]:02d}" / f"d{vd[1]}", link_lower=True)

    with ThreadPoolExecutor(max_workers=4) as pool:
        copies = list(pool.map(copy, itertools.product(range(args.vms), range(args.disks_per_vm))))
    n = args.disks_per_vm
    return [copies[v * n : (v + 1) * n] for v in range(args.vms)]


def copied_bytes(chain: Chain) -> int:
    """What a full pull copies: data below the top where the top has nothing of its own."""
    below = visible_extents(chain.pattern[:-1], chain.size)
    covered = [
        (e.offset, e.end) for e in visible_extents([chain.pattern[-1]], chain.size) if e.value is not None
    ]
    total = 0
    for extent in below:
        if extent.value:
            overlap = sum(max(0, min(extent.end, b) - max(extent.offset, a)) for a, b in covered)
            total += extent.length - overlap
    return total


# --- the VMs -------------------------------------------------------------------------------------


class VMs(Protocol):
    """Where the benchmark's VMs run and how it learns about their jobs: the part that differs
    between QEMUs reached over QMP (`QmpVMs`, here) and libvirt domains
    (`bench_operator_libvirt.py`). Everything else (the API, the agent, the watch, the numbers)
    is the same for both."""

    #: In the report: "N jobs left in {where}", "... on 20 {vms_label} x 5 disks".
    where: str
    vms_label: str
    #: What the agent does between its finalizer patch and the job's creation, and between the
    #: copy's end and its Completed patch (the report's notes).
    start_note: str
    completion_note: str

    async def start(self, args: argparse.Namespace, chains: list[list[Chain]]) -> list[Pull]:
        """Start one VM per list of chains; one `Pull` per disk (bandwidth set by the caller)."""
        ...

    def agent_env(self) -> dict[str, str]:
        """What the agent's environment needs to reach these VMs."""
        ...

    def cpu_groups(self) -> dict[str, list[int]]:
        """Processes whose CPU time is sampled, by group name (besides the agent and the API)."""
        ...

    async def collect(self, pulls: list[Pull]) -> int:
        """After the agent stopped: fill each pull's job timestamps (`qemu`: `created`,
        `copied`, `completed`, QEMU's own clock), `jobs_started` and `qemu_error`; return how
        many jobs are left in the VMs."""
        ...

    async def verify(self, pulls: list[Pull]) -> list[str]:
        """Stop the VMs (cleanly: QEMU flushes) and check `pulls`' disks; the problems found."""
        ...

    async def close(self) -> None:
        """Stop everything started, also after a failure."""
        ...


async def in_threads(fn: Callable[[Pull], str | None], pulls: Sequence[Pull]) -> list[str]:
    """`fn` over `pulls` on 4 threads (qemu-img runs); the problems it returned."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = await asyncio.gather(*(loop.run_in_executor(pool, fn, p) for p in pulls))
    return [p for p in found if p]


class QmpVMs:
    """`--vms` QEMUs (`-M none`), each with a monitor at the agent's socket template path and
    a second one on which a `qemulab.QemuWatcher` records QEMU's job events."""

    where = "QEMU"
    vms_label = "QEMUs"
    start_note = "agent: QMP, block-stream"
    completion_note = "agent: event, flush, finalize, flush, query-jobs, status write"

    def __init__(self) -> None:
        self.socket_dir: Path | None = None
        self.vms: list[QemuVM] = []
        self.watchers: list[QemuWatcher] = []

    async def start(self, args: argparse.Namespace, chains: list[list[Chain]]) -> list[Pull]:
        self.socket_dir = short_tmpdir("bps-")
        (self.socket_dir / NAMESPACE).mkdir(parents=True)
        pulls: list[Pull] = []
        for v, vm_chains in enumerate(chains):
            name = vm_name(v)
            agent_socket = self.socket_dir / NAMESPACE / f"{name}.qmp"
            extra = [
                "-chardev", f"socket,id=bp,path={agent_socket},server=on,wait=off",
                "-mon", "chardev=bp,mode=control",
            ]  # fmt: skip
            vm = QemuVM([Disk(c) for c in vm_chains], extra_monitors=1, extra_args=extra, ready_timeout=60)
            self.vms.append(vm)
            for d, chain in enumerate(vm_chains):
                pulls.append(Pull(f"pull-{name}-d{d}", name, vm.disks[d].top, chain, 0))
        t = time.monotonic()
        # Started from this (the main) thread: QEMU's pdeathsig follows the starting thread.
        await asyncio.gather(*(vm.start() for vm in self.vms))
        for vm in self.vms:
            watcher = QemuWatcher(vm.extra_sockets[0], names=["JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED"])
            self.watchers.append(await watcher.start())
        print(
            f"started {len(self.vms)} QEMUs, {len(pulls)} disks, in {time.monotonic() - t:.1f}s", flush=True
        )
        return pulls

    def agent_env(self) -> dict[str, str]:
        assert self.socket_dir is not None
        return {"BLOCKPULL_SOCKET_TEMPLATE": f"{self.socket_dir}/{{namespace}}/{{vm}}.qmp"}

    def cpu_groups(self) -> dict[str, list[int]]:
        return {"QEMUs": [vm.pid for vm in self.vms if vm.pid]}

    async def collect(self, pulls: list[Pull]) -> int:
        by_vm: dict[str, list[Pull]] = defaultdict(list)
        for pull in pulls:
            by_vm[pull.vm].append(pull)
        leftover_jobs = 0
        for index, (vm, watcher) in enumerate(zip(self.vms, self.watchers, strict=True)):
            for pull in by_vm[vm_name(index)]:
                for ev in watcher.events(job_id=pull.job_id):
                    if ev.qemu_time is None:
                        continue
                    if ev.name == "BLOCK_JOB_COMPLETED":
                        pull.qemu.setdefault("completed", ev.qemu_time)
                        if ev.data.get("error"):
                            pull.qemu_error = str(ev.data["error"])
                    elif ev.data.get("status") == "pending":
                        # The copy is done: with auto-finalize off the job waits here for the
                        # agent (flush, finalize, flush); with it on, BLOCK_JOB_COMPLETED follows
                        # at once. Either way the agent's part starts here.
                        pull.qemu.setdefault("copied", ev.qemu_time)
                    elif ev.data.get("status") == "created":
                        pull.qemu.setdefault("created", ev.qemu_time)
                        pull.jobs_started += 1
            jobs = await vm.execute("query-jobs")
            leftover_jobs += len(jobs) if isinstance(jobs, list) else 0
            await watcher.stop()
        self.watchers.clear()
        return leftover_jobs

    async def verify(self, pulls: list[Pull]) -> list[str]:
        # The disks themselves, after a clean quit (which flushes).
        await asyncio.gather(*(vm.stop() for vm in self.vms))

        def verify(pull: Pull) -> str | None:
            top = backing_chain_info(pull.chain.top)[0]
            if top.backing_filename is not None:
                return f"{pull.name}: {pull.chain.top} still has backing file {top.backing_filename}"
            assert pull.chain.reference is not None
            if not compare(pull.chain.top, pull.chain.reference):
                return f"{pull.name}: {pull.chain.top} differs from its reference"
            return None

        return await in_threads(verify, pulls)

    async def close(self) -> None:
        for watcher in self.watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        if self.vms:
            await asyncio.gather(*(vm.stop() for vm in self.vms), return_exceptions=True)
        if self.socket_dir is not None:
            remove_tree(self.socket_dir)


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class Results:
    pulls: list[Pull]
    writes: Writes
    agent_reads: Counter[str]
    service: dict[str, list[float]]
    lag: list[float]  # the stand-in's event-loop lag samples, first create -> finalizers gone
    stand_in_pid: int
    #: Status patches/s the stand-in took from AGENT_POOL threads before the run; their latencies.
    capacity: tuple[float, list[float]]
    burst_writes: int  # the agent's writes from the first create until all were seen Running
    ready: ProcSample
    end: ProcSample
    peak_rss_kib: int
    cpu_segments: list[tuple[str, float, dict[str, float]]]  # label, wall s, CPU s per process group
    bench_cpu: float  # this process, all of the run
    stand_in_cpu: float  # the stand-in's process (this one with --stand-in-thread), first create -> end
    copied_per_pull: int
    final_phase: dict[str, str]
    watch_events: int
    leftover_jobs: int
    checked: int
    problems: list[str]
    agent_exit: int | None
    burst_seconds: float
    load_before: str  # /proc/loadavg when the benchmark started
    total_seconds: float


async def run(args: argparse.Namespace, vms: VMs) -> Results:
    bandwidth = parse_bandwidth(args.bandwidth)
    workdir = Path(tempfile.mkdtemp(prefix="bpopbench-", dir="/var/tmp"))
    agent_log: Path = args.agent_log
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)  # SIGTERM cleans up as Ctrl-C does
    bench_cpu0 = time.process_time()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    server: StandIn | None = None
    agent: AgentProcess | None = None
    sampler: CpuSampler | None = None
    phase_watch: PhaseWatch | None = None
    admin: Any = None
    try:
        # --- chains, the API, the VMs -----------------------------------------------------
        t = time.monotonic()
        chains = await asyncio.to_thread(build_chains, args, workdir)
        per_pull = copied_bytes(chains[0][0])
        print(
            f"built {args.vms * args.disks_per_vm} chains ({args.layers} images, "
            f"{format_bytes(args.disk_size)} virtual, {format_bytes(per_pull)} to copy each) "
            f"in {time.monotonic() - t:.1f}s",
            flush=True,
        )
        server = StandIn(in_process=args.stand_in_thread)
        admin_kubeconfig = server.write_kubeconfig(workdir / "kubeconfig-admin", user="admin")
        capacity = (math.nan, list[float]())
        if not args.no_calibrate:
            capacity = await asyncio.to_thread(calibrate_api, admin_kubeconfig, threads=AGENT_POOL)
            print(
                f"the stand-in takes {capacity[0]:.0f} status patches/s from {AGENT_POOL} threads", flush=True
            )
        agent_kubeconfig = server.write_kubeconfig(workdir / "kubeconfig-agent", user=AGENT_USER)

        pulls = await vms.start(args, chains)
        for index, pull in enumerate(pulls):
            pull.bandwidth = 0 if index < args.unlimited else bandwidth

        # --- our watch, then the agent ----------------------------------------------------
        before = server.open_watches()
        phase_watch = PhaseWatch(admin_kubeconfig, NAMESPACE)
        phase_watch.start()
        deadline = time.monotonic() + 10
        while server.open_watches() <= before:
            if time.monotonic() > deadline:
                raise SystemExit("the benchmark's own watch did not open")
            await asyncio.sleep(0.02)
        agent = AgentProcess(agent_kubeconfig, workdir, agent_log, args, extra_env=vms.agent_env())
        t = time.monotonic()
        # From this thread too: setpriv's pdeathsig follows the starting thread.
        agent.start()
        ready = agent.sample()
        groups = {"agent": [agent.pid], "stand-in": [server.pid], **vms.cpu_groups()}
        if server.pid != os.getpid():
            groups["benchmark"] = [os.getpid()]
        sampler = CpuSampler(groups)
        sampler.start()
        print(
            f"agent pid {agent.pid} ready in {time.monotonic() - t:.1f}s (CPU {ready.cpu:.2f}s, "
            f"RSS {ready.rss_kib / 1024:.0f} MiB); its log: {agent_log}",
            flush=True,
        )
        await asyncio.sleep(args.settle)

        # --- create them all ----------------------------------------------------------------
        admin = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(admin_kubeconfig)
        )
        custom = kubernetes.client.CustomObjectsApi(admin)

        def create(pull: Pull) -> None:
            pull.create_start = time.time()
            body = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, pull.manifest())
            pull.create_end = time.time()
            pull.uid = str(body["metadata"]["uid"])  # type: ignore[index]

        # Disk 0 of every VM first, then disk 1...: a VM's disks are not created back to back.
        order = sorted(pulls, key=lambda p: (p.name.rsplit("-d", 1)[1], p.vm))
        burst_start = time.time()
        stand_in_cpu0 = proc_cpu_seconds(server.pid)
        with ThreadPoolExecutor(max_workers=args.create_threads) as pool:
            await asyncio.gather(*(loop.run_in_executor(pool, create, p) for p in order))
        print(f"created {len(pulls)} BlockPulls in {time.time() - burst_start:.2f}s", flush=True)

        # --- wait for the outcome ---------------------------------------------------------
        timeout = args.timeout or max(120.0, 10 * per_pull / (bandwidth or per_pull))
        deadline = time.monotonic() + timeout
        next_print = time.monotonic() + 5
        while True:
            phases = phase_watch.phases()
            if phases["Completed"] + phases["Failed"] >= len(pulls):
                break
            if phase_watch.error is not None:
                raise SystemExit(f"the benchmark's watch failed: {phase_watch.error!r}")
            if agent.exited() is not None:
                raise SystemExit(f"the agent exited with {agent.exited()}; see {agent_log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"not all BlockPulls finished within {timeout:g}s: {dict(phases)}")
            if time.monotonic() >= next_print:
                print(f"  {time.time() - burst_start:5.1f}s: {dict(sorted(phases.items()))}", flush=True)
                next_print += 5
            await asyncio.sleep(0.05)
        print(f"all finished {time.time() - burst_start:.1f}s after the first create", flush=True)
        # The finalizers come off after the outcome; wait for that, then watch a quiet
        # period in which nothing should be written any more.
        deadline = time.monotonic() + 30
        while any((obj.get("metadata") or {}).get("finalizers") for obj in server.objects()):
            if time.monotonic() > deadline:
                print("  WARNING: finalizers still there 30 s after the last outcome", flush=True)
                break
            await asyncio.sleep(0.1)
        finalizers_gone = time.time()
        await asyncio.sleep(args.quiet)
        end = agent.sample()
        peak_rss_kib = agent.peak_rss_kib()
        agent_exit = agent.stop()
        bench_cpu = time.process_time() - bench_cpu0
        stand_in_cpu = proc_cpu_seconds(server.pid) - stand_in_cpu0

        # --- the VMs' side: job timestamps, no job left, the disks ----------------------------
        leftover_jobs = await vms.collect(pulls)
        phase_watch.stop()
        with phase_watch.lock:
            for pull in pulls:
                pull.seen = dict(phase_watch.first_seen.get(pull.name, {}))
            final_phase = dict(phase_watch.phase)
            watch_events = phase_watch.events
        step = 1 if args.verify_sample <= 0 else max(1, len(pulls) // args.verify_sample)
        sample = pulls[::step]
        problems = await vms.verify(sample)

        # --- the agent's requests ---------------------------------------------------------
        requests = server.requests()
        service, lag = server.probes()
        agent_requests = [r for r in requests if r.user == AGENT_USER]
        writes = Writes.split(r for r in agent_requests if r.is_write)
        reads = Counter(r.verb for r in agent_requests if not r.is_write and r.is_resource_request)
        if args.dump_requests:
            dump_requests(Path(args.dump_requests), requests)
        all_running = max((p.seen["Running"] for p in pulls if "Running" in p.seen), default=math.nan)
        first_done = min((p.seen["Completed"] for p in pulls if "Completed" in p.seen), default=math.nan)
        segments = [
            ("burst: first create -> all seen Running", burst_start, all_running),
            ("streaming: all Running -> first Completed", all_running, first_done),
            ("finishing: first Completed -> finalizers gone", first_done, finalizers_gone),
            ("idle afterwards", finalizers_gone, end.wall),
        ]
        sampler.stop()
        cpu_segments = [
            (label, b - a, {key: sampler.between(key, a, b) for key in ("machine", *groups)})
            for label, a, b in segments
            if not math.isnan(a + b) and b > a
        ]
        return Results(
            pulls=pulls,
            writes=writes,
            agent_reads=reads,
            service={
                kind: [took for when, took in times if burst_start <= when <= finalizers_gone]
                for kind, times in service.items()
            },
            lag=[late for when, late in lag if burst_start <= when <= finalizers_gone],
            stand_in_pid=server.pid,
            capacity=capacity,
            burst_writes=sum(
                1 for r in agent_requests if r.is_write and burst_start <= r.time <= all_running
            ),
            ready=ready,
            end=end,
            peak_rss_kib=peak_rss_kib,
            cpu_segments=cpu_segments,
            bench_cpu=bench_cpu,
            stand_in_cpu=stand_in_cpu,
            copied_per_pull=per_pull,
            final_phase=final_phase,
            watch_events=watch_events,
            leftover_jobs=leftover_jobs,
            checked=len(sample),
            problems=problems,
            agent_exit=agent_exit,
            burst_seconds=all_running - burst_start,
            load_before=load_before,
            total_seconds=finalizers_gone - burst_start,
        )
    finally:
        if sampler is not None:
            sampler.stop()
        if phase_watch is not None:
            phase_watch.stop()
        if agent is not None:
            agent.stop()
        await vms.close()
        if admin is not None:
            admin.close()
        if server is not None:
            server.stop()
        if not args.keep:
            remove_tree(workdir)


# --- the report ----------------------------------------------------------------------------------


def report(args: argparse.Namespace, r: Results, vms: VMs) -> bool:
    pulls, w = r.pulls, r.writes
    names = [p.name for p in pulls]
    n = len(pulls)

    to_running = deltas((p.create_end, p.seen.get("Running")) for p in pulls)
    to_completed = deltas(
        (p.qemu.get("copied", p.qemu.get("completed")), p.seen.get("Completed")) for p in pulls
    )
    budgets = {name: status_budget(w.status.get(name, []), args.interval) for name in names}
    over = [name for name, b in budgets.items() if b.writes > b.budget]
    per_object: dict[str, list[int]] = {
        "status patches": [len(w.status.get(x, [])) for x in names],
        "Events": [len(w.events.get(x, [])) for x in names],
        "finalizer patches": [len(w.finalizers.get(x, [])) for x in names],
        "other metadata patches (kopf annotations)": [len(w.other_meta.get(x, [])) for x in names],
    }
    totals = [sum(counts) for counts in zip(*per_object.values(), strict=True)]
    status_bytes = [len(json.dumps(req.body)) for reqs in w.status.values() for req in reqs]
    reasons = Counter(str(body_of(req).get("reason")) for reqs in w.events.values() for req in reqs)
    sequences = Counter(b.sequence for b in budgets.values())
    completed = sum(1 for x in names if r.final_phase.get(x) == "Completed")
    peak_mib = r.peak_rss_kib / 1024
    run_cpu, run_wall = r.end.cpu - r.ready.cpu, r.end.wall - r.ready.wall

    ok_running = len(to_running) == n and percentile(to_running, 99) < TARGET_P99_SECONDS
    ok_completed = len(to_completed) == n and percentile(to_completed, 99) < TARGET_P99_SECONDS
    ok_writes = not over
    ok_rss = peak_mib < TARGET_RSS_MIB
    # The contract: once Completed or Failed is written the status never changes again, and an
    # object gets exactly one QEMU job.
    after_outcome = {name: b.sequence for name, b in budgets.items() if b.writes_after_outcome}
    rerun_jobs = {p.name: p.jobs_started for p in pulls if p.jobs_started > 1}
    contract: list[str] = []
    if after_outcome:
        name, sequence = next(iter(after_outcome.items()))
        contract.append(
            f"{len(after_outcome)} objects had their status written again after Completed/Failed "
            f"(e.g. {name}: {sequence})"
        )
    if rerun_jobs:
        contract.append(
            f"{len(rerun_jobs)} objects got more than one QEMU job (up to {max(rerun_jobs.values())}; "
            f"e.g. {next(iter(rerun_jobs))})"
        )
    ok_outcome = (
        completed == n
        and not r.problems
        and not contract
        and r.leftover_jobs == 0
        and not any(p.qemu_error for p in pulls)
    )
    verdict = {True: "met", False: "MISSED"}
    rate = (
        "unlimited"
        if not parse_bandwidth(args.bandwidth)
        else f"{format_bytes(parse_bandwidth(args.bandwidth))}/s"
    )

    def mean_max(values: Sequence[int]) -> str:
        return f"{statistics.mean(values):5.2f} / {max(values)}"

    # When each step happened, per object: our clock, QEMU's, the stand-in's request log.
    points = [
        {
            "create start": p.create_start,
            "created": p.create_end,
            "finalizer": w.first_finalizer(p.name),
            "first status": w.first_any_status(p.name),
            "job created": p.qemu.get("created"),
            "Running patch": w.first_status(p.name, "Running"),
            "Running seen": p.seen.get("Running"),
            "job completed": p.qemu.get("copied", p.qemu.get("completed")),
            "job finalized": p.qemu.get("completed"),
            "event seen": p.qemu.get("event"),
            "Completed patch": w.first_status(p.name, "Completed"),
            "Completed seen": p.seen.get("Completed"),
        }
        for p in pulls
    ]

    def between(start: str, end: str) -> str:
        return dist(deltas((point[start], point[end]) for point in points))

    target = f"target p99 < {TARGET_P99_SECONDS:g} s"
    rows: list[tuple[str, str, str]] = [
        ("create -> Running (create returned -> watch sees it)", dist(to_running),
         f"{target}: {verdict[ok_running]}"),
        ("  create call (admin client -> stand-in)", between("create start", "created"), ""),
        ("  create returned -> its first status at the API", between("created", "first status"),
         "without status kstatus reads it as done"),
        ("  create returned -> agent's finalizer patch", between("created", "finalizer"),
         "kopf: watch, queue, handler"),
        ("  finalizer patch -> QEMU job created", between("finalizer", "job created"), vms.start_note),
        ("  QEMU job created -> Running patch at the API", between("job created", "Running patch"),
         "agent: status write"),
        ("  Running patch at the API -> watch sees it", between("Running patch", "Running seen"),
         "stand-in + watch"),
        ("QEMU copy done -> Completed (pending -> watch)", dist(to_completed),
         f"{target}: {verdict[ok_completed]}"),
        ("  copy done -> Completed patch", between("job completed", "Completed patch"), vms.completion_note),
    ]  # fmt: skip
    if any(point["event seen"] is not None for point in points):
        rows += [
            ("    copy done -> libvirt's event at an observer", between("job completed", "event seen"),
             "libvirtd: finalize, dismiss, new XML, event"),
            ("    libvirt's event at an observer -> Completed patch",
             between("event seen", "Completed patch"), "agent: event, job info, status write"),
        ]  # fmt: skip
    if any(p.qemu.get("copied") and p.qemu.get("completed") for p in pulls):
        # QEMU changed the chain when the agent finalized it: what the agent does after that is
        # what an agent with auto-finalize (before the durability fix) did after the copy.
        rows += [
            ("    copy done -> QEMU's BLOCK_JOB_COMPLETED", between("job completed", "job finalized"),
             "agent: event, flush, finalize"),
            ("    QEMU's BLOCK_JOB_COMPLETED -> Completed patch", between("job finalized", "Completed patch"),
             "agent: flush, query-jobs, status write"),
        ]  # fmt: skip
    rows += [
        ("  Completed patch at the API -> watch sees it", between("Completed patch", "Completed seen"),
         "stand-in + watch"),
        ("  (the job in QEMU: created -> completed)", between("job created", "job completed"), ""),
        ("API writes per object (mean / max)", mean_max(totals),
         f"{sum(totals) + len(w.unattributed)} by {AGENT_USER}, {len(w.unattributed)} about no object"),
    ]  # fmt: skip
    for label, counts in per_object.items():
        note = ""
        if label == "status patches":
            note = f"{statistics.mean(status_bytes):.0f} bytes each on average" if status_bytes else ""
        elif label == "Events":
            note = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        rows.append((f"  {label}", mean_max(counts), note))
    rows += [
        ("status writes over budget", f"{len(over)} of {n} objects",
         f"budget = transitions + ceil(first-to-last write s / {args.interval:g}s): {verdict[ok_writes]}"),
        ("  same-phase status writes < 1 interval after the previous",
         f"{sum(b.early for b in budgets.values())} in all", "what the budget's rounding absorbs"),
        ("agent CPU, ready -> stopped", f"{run_cpu:6.2f} s",
         f"{100 * run_cpu / run_wall:4.1f}% of one core over {run_wall:.1f}s (+{r.ready.cpu:.2f}s to start)"),
    ]  # fmt: skip
    cores = os.cpu_count() or 1
    for label, wall, cpu in r.cpu_segments:
        others = ", ".join(
            f"{k} {100 * v / wall:.0f}%" for k, v in cpu.items() if k not in ("agent", "machine")
        )
        rows.append(
            (
                f"  {label} ({wall:.1f}s)",
                f"{cpu['agent']:6.2f} s",
                f"agent {100 * cpu['agent'] / wall:.0f}% of a core; {others}; "
                f"machine {100 * cpu['machine'] / wall / cores:.0f}% busy",
            )
        )
    rows += [
        ("agent peak RSS (VmHWM)", f"{peak_mib:6.1f} MiB",
         f"target < {TARGET_RSS_MIB:g} MiB: {verdict[ok_rss]} (at ready {r.ready.rss_kib / 1024:.0f} MiB)"),
        ("agent reads", ", ".join(f"{k} {v}" for k, v in sorted(r.agent_reads.items())), ""),
    ]  # fmt: skip
    for kind in (f"PATCH {PLURAL}/status", "POST events", f"PATCH {PLURAL}", f"POST {PLURAL}"):
        if r.service.get(kind):
            rows.append((f"stand-in time per {kind}", dist(r.service[kind]), f"n={len(r.service[kind])}"))
    rows += [
        ("stand-in capacity, measured before the run", f"{r.capacity[0]:5.0f} status patches/s",
         f"from {AGENT_POOL} client threads (the agent's pool); client latency {dist(r.capacity[1])}"),
        ("agent writes from first create to all Running", f"{r.burst_writes:5d}",
         f"= {r.burst_writes / r.capacity[0]:.1f}s of stand-in at that rate (burst {r.burst_seconds:.1f}s)"),
        ("stand-in event-loop lag (10 ms timer)", dist(r.lag),
         "how long an arrived request may wait before the stand-in looks at it"),
        ("stand-in CPU, first create -> end", f"{r.stand_in_cpu:6.2f} s",
         "in this process" if args.stand_in_thread else f"its own process, pid {r.stand_in_pid}"),
        ("benchmark process CPU, all of the run", f"{r.bench_cpu:6.2f} s",
         "with the stand-in" if args.stand_in_thread else "watch, job watchers, setup"),
        ("outcome", f"{completed}/{n} Completed",
         f"{r.leftover_jobs} jobs left in {vms.where}, {r.checked} disks compared: {len(r.problems)} bad; "
         f"{len(contract)} contract violations: {verdict[ok_outcome]}"),
    ]  # fmt: skip

    print()
    print(
        f"BlockPull agent benchmark: {n} BlockPulls on {args.vms} {vms.vms_label} x "
        f"{args.disks_per_vm} disks, one agent; "
        f"{args.layers}-image chains of {format_bytes(args.disk_size)}, {format_bytes(r.copied_per_pull)} "
        f"copied per pull at {rate}{f' ({args.unlimited} unlimited)' if args.unlimited else ''}; "
        f"status interval {args.interval:g}s, poll {args.poll_interval:g}s"
    )
    print(
        f"{os.cpu_count()} CPUs, load average before the run {r.load_before} (other work on the machine "
        "skews every number); stand-in in "
        f"{'a thread of this process' if args.stand_in_thread else 'its own process'}"
    )
    print(
        f"all Running {r.burst_seconds:.1f}s and all done {r.total_seconds:.1f}s after the first create; "
        f"p50/p99/max over the {n} objects"
    )
    width = max(len(row[0]) for row in rows)
    for label, value, note in rows:
        print(f"  {label.ljust(width)}  {value}  {note}".rstrip())
    print(f"  status writes per object, by phase: {dict(sequences.most_common(5))}")
    print(f"  watch events seen: {r.watch_events}; agent exit status {r.agent_exit}; log: {args.agent_log}")
    for problem in r.problems[:10]:
        print(f"  PROBLEM: {problem}")
    for problem in contract:
        print(f"  PROBLEM: {problem}")
    for pull in pulls:
        if pull.qemu_error:
            print(f"  PROBLEM: {pull.name}: QEMU job failed: {pull.qemu_error}")
    met = ok_running and ok_completed and ok_writes and ok_rss and ok_outcome
    print(f"  verdict: {'every target met' if met else 'targets MISSED (see above)'}")
    print(f"rerun: .venv/bin/python {sys.argv[0]} {' '.join(sys.argv[1:])}".rstrip())
    return ok_outcome


def make_parser(description: str | None, *, vm_word: str, agent_log: str) -> argparse.ArgumentParser:
    """The options of this benchmark (and of `bench_operator_libvirt.py`, which shares them)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add: Callable[..., Any] = parser.add_argument
    add("--vms", type=int, default=20, help=f"{vm_word}s (default 20)")
    add("--disks-per-vm", type=int, default=5, help=f"disks per {vm_word}, one BlockPull each (default 5)")
    add("--layers", type=int, default=3, help="images per chain (default 3)")
    add("--disk-size", type=parse_bandwidth, default="32Mi", help="virtual size of a disk (default 32Mi)")
    add("--data", type=parse_bandwidth, default="8Mi", help="data written into a chain (default 8Mi)")
    add("--bandwidth", default="1Mi", help="spec.bandwidth of each BlockPull (default 1Mi/s; 0: unlimited)")
    add("--unlimited", type=int, default=0, help="this many BlockPulls get no bandwidth limit (default 0)")
    add("--interval", type=float, default=2.0, help="BLOCKPULL_STATUS_INTERVAL (default 2, the agent's)")
    add("--poll-interval", type=float, default=1.0, help="BLOCKPULL_POLL_INTERVAL (default 1, the agent's)")
    add("--log-level", default="INFO", help="BLOCKPULL_LOG_LEVEL of the agent (default INFO)")
    add("--agent-env", action="append", default=[], metavar="KEY=VALUE", help="more agent environment")
    add("--agent-profile", metavar="FILE", help="run the agent under cProfile, which writes FILE at exit")
    add("--create-threads", type=int, default=8, help="threads creating the BlockPulls (default 8)")
    add("--settle", type=float, default=1.0, help="seconds from agent ready to the burst (default 1)")
    add("--quiet", type=float, default=2.0, help="seconds watched after the finalizers are gone (default 2)")
    add("--timeout", type=float, default=0.0, help="give up after this many seconds (default: from the rate)")
    add("--verify-sample", type=int, default=0, help="compare only this many disks (default 0: all)")
    add("--no-calibrate", action="store_true", help="skip measuring the stand-in's capacity first")
    add("--stand-in-thread", action="store_true", help="run the API stand-in in a thread of this process")
    add("--agent-log", default=agent_log, help=f"the agent's log (kept; default {agent_log})")
    add("--dump-requests", metavar="FILE", help="write every API request as JSON lines to FILE")
    add("--keep", action="store_true", help="keep the work directory (chains, kubeconfigs)")
    return parser


def run_and_report(args: argparse.Namespace, vms: VMs) -> int:
    """Run the benchmark on `vms`, print the report; 0 if the outcome is right, 1 if not, 130
    when interrupted."""
    args.agent_log = Path(args.agent_log).absolute()
    args.agent_log.parent.mkdir(parents=True, exist_ok=True)
    args.agent_log.write_bytes(b"")
    try:
        results = asyncio.run(run(args, vms))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process stopped and the work directory removed", file=sys.stderr)
        return 130
    return 0 if report(args, results, vms) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__, vm_word="QEMU", agent_log="/var/tmp/bench_operator-agent.log")
    args = parser.parse_args(argv)
    if args.vms < 1 or args.disks_per_vm < 1:
        parser.error("--vms and --disks-per-vm must be at least 1")
    if not qemu_available():
        parser.error("the QEMU tools are not on PATH (scripts/setup.sh installs them)")
    return run_and_report(args, QmpVMs())


if __name__ == "__main__":
    sys.exit(main())
