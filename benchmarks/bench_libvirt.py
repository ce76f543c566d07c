#!/usr/bin/env python3
"""One pull on a libvirt domain three ways: the agent, `blockpull pull --connect`, `virsh blockpull --wait`.

All three go through libvirt's block-job API (the same `block-stream` in QEMU); this measures
what each adds to the job's own time, on a real multi-GiB chain. For each of `--runs` rounds and
each tool: a fresh copy of one big qcow2 chain (`qemulab.copy_chain`, lower images hard-linked:
a full pull only writes the top), a fresh transient TCG domain created paused on a private
libvirtd (`virtlab`, started here and stopped at the end), then:

- `agent`: a BlockPull (`spec.disk: vda`, no bandwidth limit) created on the API stand-in
  (`testapiserver`, its own process) and served by ONE long-running agent process
  (`python -m blockpull.agent`, `BLOCKPULL_LIBVIRT_URI` set, started once before the runs with
  bench_operator.py's settings); timed from right before the create call to when a watch on
  blockpulls first delivers `status.phase: Completed`;
- `blockpull`: `blockpull pull -c URI DOMAIN vda -q` as a subprocess, spawn to exit;
- `virsh`: `virsh -c URI blockpull DOMAIN vda --wait` as a subprocess, spawn to exit.

The job's own time is QEMU's: `JOB_STATUS_CHANGE` `created` to `concluded`, QEMU's timestamps,
read from the private libvirtd's log of its QEMU monitor traffic (`libvirt_jobs`). A tool's
overhead is its time minus the job's, split into before the job (start -> `created`) and after
it (`concluded` -> end). Each run checks that libvirt's live XML shows no backing file
afterwards. The tools take turns in a rotating order, after one unmeasured warm-up pull with
the command and one with the agent (page cache, bytecode, the agent's libvirt connection).

Prints medians, min and max. Run: `.venv/bin/python benchmarks/bench_libvirt.py --runs 5` as root.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    status_phase,
)
from libvirt_jobs import COMPLETED, BlockJobEvents, qemu_job_events

from qemulab import Chain, copy_chain, make_big_chain
from virtlab import Domain, DomainDisk, LibvirtDaemon, libvirtd_available

TOOLS = ("agent", "blockpull", "virsh")


def cli() -> list[str]:
    script = Path(sys.executable).parent / "blockpull"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blockpull.cli"]


def timed(argv: list[str]) -> tuple[float, float]:
    """Run `argv`; wall-clock times right before the spawn and right after the exit."""
    start = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    end = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return start, end


@dataclass
class Run:
    tool: str
    domain: str
    start: float  # time.time(): spawn, or right before the create call
    end: float  # time.time(): exit, or when the watch first saw Completed
    event: float | None = None  # libvirt's BLOCK_JOB_2 COMPLETED at the benchmark's own connection
    patch: float | None = None  # agent: the Completed status patch reached the stand-in
    created: float | None = None  # QEMU's JOB_STATUS_CHANGE created (QEMU's clock)
    concluded: float | None = None  # ... concluded

    @property
    def wall(self) -> float:
        return self.end - self.start

    @property
    def job(self) -> float | None:
        return None if self.created is None or self.concluded is None else self.concluded - self.created


class AgentSide:
    """The API stand-in, ONE agent for the private libvirtd, and a watch on blockpulls."""

    def __init__(self, daemon: LibvirtDaemon, workdir: Path, log: Path) -> None:
        self.server = StandIn(in_process=False)
        admin = self.server.write_kubeconfig(workdir / "kubeconfig-admin", user="admin")
        before = self.server.open_watches()
        self.watch = PhaseWatch(admin, NAMESPACE)
        self.watch.start()
        deadline = time.monotonic() + 10
        while self.server.open_watches() <= before:
            if time.monotonic() > deadline:
                raise SystemExit("the benchmark's own watch did not open")
            time.sleep(0.02)
        settings = argparse.Namespace(
            interval=2.0, poll_interval=1.0, log_level="INFO", agent_env=[], agent_profile=None
        )
        log.write_bytes(b"")
        self.agent = AgentProcess(
            self.server.write_kubeconfig(workdir / "kubeconfig-agent", user=AGENT_USER),
            workdir,
            log,
            settings,
            extra_env={"BLOCKPULL_LIBVIRT_URI": daemon.uri, "BLOCKPULL_DOMAIN_TEMPLATE": "{namespace}_{vm}"},
        )
        self.agent.start()
        self.client: Any = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(admin)
        )
        self.custom = kubernetes.client.CustomObjectsApi(self.client)

    def pull(self, vm: str, timeout: float = 300.0) -> tuple[float, float, float | None]:
        """Create a BlockPull of `vm`'s vda; (before the create call, Completed seen, Completed
        patch at the API)."""
        name = f"pull-{vm}"
        manifest = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BlockPull",
            "metadata": {"name": name},
            "spec": {"nodeName": NODE, "vm": vm, "disk": "vda"},
        }
        start = time.time()
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, manifest)
        deadline = time.monotonic() + timeout
        while True:
            with self.watch.lock:
                seen = dict(self.watch.first_seen.get(name, {}))
            if "Completed" in seen or "Failed" in seen:
                break
            if self.agent.exited() is not None:
                raise SystemExit(f"the agent exited with {self.agent.exited()}; see {self.agent.log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not finish within {timeout:g}s")
            time.sleep(0.01)
        if "Completed" not in seen:
            raise SystemExit(f"{name} Failed: {self.server.objects()}")
        patch = next(
            (
                r.time
                for r in self.server.requests()
                if r.user == AGENT_USER and r.name == name and status_phase(r) == "Completed"
            ),
            None,
        )
        return start, seen["Completed"], patch

    def close(self) -> None:
        self.watch.stop()
        self.agent.stop()
        self.client.close()
        self.server.stop()


@dataclass
class Lab:
    daemon: LibvirtDaemon
    chain: Chain
    workdir: Path
    events: BlockJobEvents
    agent: AgentSide | None

    def one_run(self, vm: str, tool: str) -> Run:
        """A fresh copy of the chain in a fresh domain `bench_<vm>`, pulled with `tool`."""
        copy = copy_chain(self.chain, self.workdir / vm, link_lower=True)
        domain = Domain(self.daemon, f"{NAMESPACE}_{vm}", [DomainDisk("vda", copy.top, copy)]).create()
        uri = self.daemon.uri
        try:
            patch = None
            if tool == "agent":
                assert self.agent is not None
                start, end, patch = self.agent.pull(vm)
            elif tool == "blockpull":
                start, end = timed([*cli(), "pull", "-c", uri, domain.name, "vda", "-q"])
            else:
                start, end = timed(["virsh", "-q", "-c", uri, "blockpull", domain.name, "vda", "--wait"])
            chain_now = domain.xml_chain()
            if chain_now != [str(copy.top)]:
                raise SystemExit(f"{tool}: the domain still has a backing chain: {chain_now}")
            ended = self.events.wait(domain.name, "vda", timeout=5)
            if ended is None or ended.status != COMPLETED:
                raise SystemExit(f"{tool}: libvirt reported no completed job on {domain.name}: {ended}")
            return Run(tool, domain.name, start, end, event=ended.arrived, patch=patch)
        finally:
            domain.destroy()
            shutil.rmtree(self.workdir / vm, ignore_errors=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


def summary(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label:<48} no samples"
    return (
        f"  {label:<48} median {ms(statistics.median(values))} ms   "
        f"min {ms(min(values))}   max {ms(max(values))}   (n={len(values)})"
    )


def _minus(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else end - start


def _overhead(r: Run) -> float | None:
    return None if r.job is None else r.wall - r.job


#: What is printed per tool: label, value of one run, agent only.
ROWS: list[tuple[str, Callable[[Run], float | None], bool]] = [
    ("wall time", lambda r: r.wall, False),
    ("the job in QEMU (created -> concluded)", lambda r: r.job, False),
    ("overhead = wall time - job", _overhead, False),
    ("  before: start -> job created", lambda r: _minus(r.created, r.start), False),
    ("  after: job concluded -> end", lambda r: _minus(r.end, r.concluded), False),
    ("    job concluded -> libvirt's event here", lambda r: _minus(r.event, r.concluded), False),
    ("    job concluded -> Completed patch at the API", lambda r: _minus(r.patch, r.concluded), True),
    ("    Completed patch -> watch sees it", lambda r: _minus(r.end, r.patch), True),
]

LABELS = {
    "agent": "agent: create -> watch sees Completed",
    "blockpull": "blockpull pull -c URI DOMAIN vda",
    "virsh": "virsh blockpull DOMAIN vda --wait",
}


def report(runs: list[Run]) -> None:
    def of(tool: str, fn: Callable[[Run], float | None]) -> list[float]:
        return [v for r in runs if r.tool == tool and (v := fn(r)) is not None]

    tools = [tool for tool in TOOLS if of(tool, lambda r: r.wall)]
    for tool in tools:
        print(f"{LABELS[tool]}:")
        for label, fn, agent_only in ROWS:
            if tool == "agent" or not agent_only:
                print(summary(label, of(tool, fn)))
    medians = {tool: statistics.median(of(tool, _overhead) or [math.nan]) for tool in tools}
    print("overhead medians: " + ", ".join(f"{tool} {ms(v).strip()} ms" for tool, v in medians.items()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-gib", type=float, default=1.0, help="guest-visible data in the chain")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-agent", action="store_true", help="only the two commands (no API, no agent)")
    parser.add_argument("--agent-log", type=Path, default=Path("/var/tmp/bench_libvirt-agent.log"))
    args = parser.parse_args()
    if not libvirtd_available():
        raise SystemExit("libvirtd, virtlogd, virsh, unshare and nsenter are needed (scripts/setup.sh)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-libvirt-", dir=args.workdir or "/var/tmp"))
    daemon = LibvirtDaemon()
    agent: AgentSide | None = None
    events: BlockJobEvents | None = None
    try:
        daemon.start()
        events = BlockJobEvents(daemon.uri).start()
        chain = make_big_chain(workdir / "template", args.data_gib, reference="none")
        print(
            f"chain: {len(chain.images)} images, {chain.size >> 30} GiB virtual, {args.data_gib} GiB of data"
        )
        tools = [t for t in TOOLS if t != "agent" or not args.no_agent]
        if "agent" in tools:
            agent = AgentSide(daemon, workdir, args.agent_log.absolute())
            print(f"agent pid {agent.agent.pid} ready; its log: {args.agent_log}")
        lab = Lab(daemon, chain, workdir, events, agent)
        # Unmeasured: page cache, bytecode, the agent's first libvirt connection.
        for tool in tools:
            if tool != "virsh":
                lab.one_run(f"warmup-{tool}", tool)
        runs: list[Run] = []
        for index in range(args.runs):
            order = tools[index % len(tools) :] + tools[: index % len(tools)]
            runs += [lab.one_run(f"{tool}-{index}", tool) for tool in order]
        jobs = qemu_job_events(daemon.libvirtd_log, [r.domain for r in runs])
        for r in runs:
            job = jobs.get((r.domain, "vda"))
            if job is not None:
                r.created = job.times.get("created")
                r.concluded = job.times.get("concluded")
        print(f"{args.runs} runs of each tool, median (min, max):")
        report(runs)
    finally:
        if agent is not None:
            agent.close()
        if events is not None:
            events.stop()
        daemon.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
