#!/usr/bin/env python3
"""What the `blockpull` command costs on top of QEMU's own work, on a real multi-GiB chain.

Measures, as medians over `--runs` runs, each on a fresh copy of one big qcow2 chain and a
fresh QEMU (`qemu-system-x86_64 -M none`, libvirt-style `-blockdev` nodes, built by qemulab):

1. the wall time of `blockpull pull SOCKET DISK`, from process start to exit;
2. the job's own time inside QEMU, `JOB_STATUS_CHANGE created` -> `concluded`, taken from
   QEMU's event timestamps as seen on a SECOND monitor (`-chardev ... -mon`) by a watcher;
3. their difference: what the tool adds (interpreter start, imports, connect, reading the
   chain, starting the job; then reading the outcome, printing, dismissing, exiting), split
   into the part before `created` and the part after `concluded` (event arrival times);
4. `qemu-img convert -O qcow2` of the same chain, the I/O floor for reading it all once;
5. the CPU the follow loop costs while a job runs: `blockpull pull --bandwidth` (progress
   display on, to /dev/null) on a throttled job, its process CPU time (`/proc/PID/stat`) over
   `--follow-seconds` once the job runs, as % of one core; then Ctrl-C (SIGINT), which must
   cancel the job and exit 130;

plus the interpreter's start-up and `import blockpull.cli` times, which are part of (3).

Every number is taken on the `blockpull` command as a separate process, so
`--cli-pythonpath TREE/operator` measures another version of it (an exported older commit)
with everything else unchanged.

Run: `.venv/bin/python benchmarks/bench_cli.py --runs 5` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_operator import proc_cpu_seconds

from blockpull.cli import POLL_INTERVAL
from blockpull.quantity import format_bytes
from qemulab import Chain, QemuVM, QemuWatcher, backing_chain_info, compare, copy_chain, make_big_chain
from qemulab.tools import QEMU_IMG

TARGET_OVERHEAD_MS = 20.0
TARGET_FOLLOW_CPU_PERCENT = 1.0


def cli_argv() -> list[str]:
    """The installed console script of this Python (not a version-manager shim)."""
    script = Path(sys.executable).parent / "blockpull"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blockpull.cli"]


def cli_env(pythonpath: str | None = None) -> dict[str, str]:
    """The measured command's environment; `pythonpath`: a source root to import blockpull from."""
    # An installed package has its bytecode compiled (pip does it); a development checkout
    # under PYTHONDONTWRITEBYTECODE would recompile blockpull on every start instead.
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if pythonpath:
        # Ahead of site-packages, so ahead of the editable install of this checkout.
        env["PYTHONPATH"] = pythonpath
    return env


def cli_source(env: dict[str, str]) -> str:
    """Where the measured command's `blockpull` package comes from."""
    probe = [sys.executable, "-c", "import blockpull; print(blockpull.__file__)"]
    done = subprocess.run(probe, capture_output=True, text=True, env=env, check=True)
    return str(Path(done.stdout.strip()).parent)


@dataclass(frozen=True)
class PullRun:
    wall: float  # process start -> exit
    job: float  # created -> concluded, QEMU's clock
    before_created: float  # process start -> `created` arrived
    after_concluded: float  # `concluded` arrived -> process exit

    @property
    def overhead(self) -> float:
        return self.wall - self.job


def timed_run(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float, int, str]:
    """(start, end, exit status, stderr): monotonic times taken right around the process."""
    start = time.monotonic()
    done = subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False
    )
    return start, time.monotonic(), done.returncode, done.stderr


async def one_pull(chain: Chain, workdir: Path, index: int, env: dict[str, str], *, verify: bool) -> PullRun:
    copy = copy_chain(chain, workdir / f"run{index}", link_lower=True)
    job_id = f"bench{index}"
    try:
        vm = await QemuVM([copy], extra_monitors=1).start()
        try:
            async with QemuWatcher(vm.extra_sockets[0], names=["JOB_STATUS_CHANGE"]) as watcher:
                argv = [*cli_argv(), "pull", str(vm.qmp_socket), vm.disks[0].top, "--job-id", job_id, "-q"]
                start, end, status, stderr = await asyncio.to_thread(timed_run, argv, env)
                if status != 0:
                    raise SystemExit(f"blockpull pull failed ({status}): {stderr}")
                created = await watcher.wait_job_status(job_id, "created", timeout=5)
                concluded = await watcher.wait_job_status(job_id, "concluded", timeout=5)
                job = watcher.job_duration(job_id, clock="qemu")
                assert job is not None
        finally:
            await vm.stop()
        if verify:
            if backing_chain_info(copy.top)[0].backing_filename is not None:
                raise SystemExit(f"{copy.top} still has a backing file after the pull")
            if not compare(copy.top, chain.top):
                raise SystemExit(f"{copy.top} differs from the chain it was pulled from")
        return PullRun(end - start, job, created.received - start, end - concluded.received)
    finally:
        shutil.rmtree(copy.directory, ignore_errors=True)


def one_convert(chain: Chain, workdir: Path) -> float:
    out = workdir / "convert.qcow2"
    start, end, status, stderr = timed_run([QEMU_IMG, "convert", "-O", "qcow2", str(chain.top), str(out)])
    out.unlink(missing_ok=True)
    if status != 0:
        raise SystemExit(f"qemu-img convert failed: {stderr}")
    return end - start


async def follow_cpu(
    chain: Chain, workdir: Path, seconds: float, bandwidth: str, env: dict[str, str]
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the `blockpull pull` process following a throttled job."""
    copy = copy_chain(chain, workdir / "follow", link_lower=True)
    try:
        async with (
            QemuVM([copy], extra_monitors=1) as vm,
            QemuWatcher(vm.extra_sockets[0], names=["JOB_STATUS_CHANGE"]) as watcher,
        ):
            argv = [*cli_argv(), "pull", str(vm.qmp_socket), vm.disks[0].top]
            argv += ["--bandwidth", bandwidth, "--job-id", "follow"]
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            try:
                await watcher.wait_job_status("follow", "running", timeout=10)
                await asyncio.sleep(1.0)  # past start-up: only the follow loop from here
                cpu0, wall0 = proc_cpu_seconds(process.pid), time.monotonic()
                await asyncio.sleep(seconds)
                cpu, wall = proc_cpu_seconds(process.pid) - cpu0, time.monotonic() - wall0
                if process.returncode is not None:
                    raise SystemExit(
                        f"the throttled pull ended too soon (exit {process.returncode}); "
                        "lower --follow-bandwidth"
                    )
                process.send_signal(signal.SIGINT)  # Ctrl-C: cancel the job, exit 128 + 2
                status = await asyncio.wait_for(process.wait(), 30)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            if status != 128 + signal.SIGINT:
                raise SystemExit(f"blockpull pull exited {status} on SIGINT, not 130")
            await watcher.wait_job_status("follow", "concluded", timeout=10)
        return cpu, wall
    finally:
        shutil.rmtree(copy.directory, ignore_errors=True)


def startup_times(runs: int, env: dict[str, str]) -> dict[str, float]:
    """Medians (s) of starting Python bare, normally, and with `import blockpull.cli`."""
    probes = {
        "python -I -S -c pass": [sys.executable, "-I", "-S", "-c", "pass"],
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import asyncio'": [sys.executable, "-c", "import asyncio"],
        "python -c 'import blockpull.cli'": [sys.executable, "-c", "import blockpull.cli"],
        "blockpull --help": [*cli_argv(), "--help"],
    }
    results: dict[str, float] = {}
    for name, argv in probes.items():
        timed_run(argv, env)  # warm: bytecode, page cache
        samples = []
        for _ in range(runs):
            start, end, _, _ = timed_run(argv, env)
            samples.append(end - start)
        results[name] = statistics.median(samples)
    in_process = [sys.executable, "-c", _IMPORT_PROBE]
    samples = []
    for _ in range(runs):
        done = subprocess.run(in_process, capture_output=True, text=True, env=env, check=True)
        samples.append(float(done.stdout))
    results["import blockpull.cli (in-process)"] = statistics.median(samples)
    return results


_IMPORT_PROBE = "import time; t = time.perf_counter(); import blockpull.cli; print(time.perf_counter() - t)"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def spread(values: Sequence[float], unit: float = 1.0, fmt: str = "{:.3f}") -> str:
    return f"[{fmt.format(min(values) * unit)} .. {fmt.format(max(values) * unit)}]"


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="measured runs per number (default 5)")
    parser.add_argument("--data-gib", type=float, default=1.6, help="data in the chain (default 1.6 GiB)")
    parser.add_argument("--follow-seconds", type=float, default=20.0, help="how long to follow (default 20)")
    parser.add_argument(
        "--follow-bandwidth", default="32Mi", help="throttle of the followed job (default 32Mi)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where the chain and its copies go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir (and its chain) afterwards")
    parser.add_argument(
        "--cli-pythonpath",
        metavar="DIR",
        help="measure the `blockpull` command of this source root (e.g. an older commit's operator/)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    env = cli_env(args.cli_pythonpath)

    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="bpbench-", dir="/var/tmp"))
    os.makedirs(workdir, exist_ok=True)
    try:
        print(f"building a chain with {args.data_gib} GiB of data in {workdir} ...", flush=True)
        started = time.monotonic()
        chain = make_big_chain(workdir / "chain", args.data_gib, reference="none")
        print(f"  built in {time.monotonic() - started:.1f}s: {' <- '.join(chain.names)}", flush=True)

        print("warm-up pull (not counted) ...", flush=True)
        await one_pull(chain, workdir, 0, env, verify=True)
        pulls: list[PullRun] = []
        for index in range(1, args.runs + 1):
            run = await one_pull(chain, workdir, index, env, verify=False)
            pulls.append(run)
            print(
                f"  pull {index}: wall {run.wall:.3f}s, job {run.job:.3f}s, "
                f"overhead {run.overhead * 1000:.1f} ms (before created {run.before_created * 1000:.1f}, "
                f"after concluded {run.after_concluded * 1000:.1f})",
                flush=True,
            )
        one_convert(chain, workdir)  # warm
        converts = [one_convert(chain, workdir) for _ in range(args.runs)]
        print(f"  qemu-img convert: {', '.join(f'{c:.3f}s' for c in converts)}", flush=True)
        startup = startup_times(max(args.runs, 10), env)
        print(f"following a throttled job for {args.follow_seconds:g}s ...", flush=True)
        cpu, wall = await follow_cpu(chain, workdir, args.follow_seconds, args.follow_bandwidth, env)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    walls = [p.wall for p in pulls]
    jobs = [p.job for p in pulls]
    overheads = [p.overhead for p in pulls]
    befores = [p.before_created for p in pulls]
    afters = [p.after_concluded for p in pulls]
    overhead = statistics.median(overheads)
    follow_percent = 100.0 * cpu / wall
    floor = startup["python -c 'import asyncio'"]
    data = format_bytes(chain.visible_data_bytes)
    print()
    print(
        f"blockpull CLI benchmark: {args.runs} runs, chain of {len(chain.images)} images, "
        f"{format_bytes(chain.size)} virtual, {data} of data; medians [min .. max]"
    )
    print(f"  CLI started as: {' '.join(cli_argv())}, its blockpull from {cli_source(env)}")
    rows = [
        ("(1) blockpull pull, process start -> exit", f"{statistics.median(walls):8.3f} s", spread(walls)),
        ("(2) job in QEMU, created -> concluded", f"{statistics.median(jobs):8.3f} s", spread(jobs)),
        (
            "(3) what the tool adds = (1) - (2)",
            ms(overhead),
            spread(overheads, 1000, "{:.1f}") + f"  target <= {TARGET_OVERHEAD_MS:g} ms",
        ),
        ("      start -> `created` arrives", ms(statistics.median(befores)), spread(befores, 1000, "{:.1f}")),
        ("      `concluded` arrives -> exit", ms(statistics.median(afters)), spread(afters, 1000, "{:.1f}")),
        (
            "      (3) minus python -c 'import asyncio'",
            ms(overhead - floor),
            "beyond what any asyncio Python program costs to start here",
        ),
        (
            "(4) qemu-img convert -O qcow2 (I/O floor)",
            f"{statistics.median(converts):8.3f} s",
            spread(converts),
        ),
        (
            f"(5) follow-loop CPU, poll {POLL_INTERVAL:g}s",
            f"{follow_percent:7.2f} %",
            f"of a core ({cpu * 1000:.0f} ms CPU in {wall:.1f}s, {wall / POLL_INTERVAL:.0f} polls)  "
            f"target < {TARGET_FOLLOW_CPU_PERCENT:g} %",
        ),
    ]
    rows += [(f"    start-up: {name}", ms(value), "") for name, value in startup.items()]
    width = max(len(row[0]) for row in rows)
    for label, value, extra in rows:
        print(f"  {label.ljust(width)}  {value}  {extra}".rstrip())
    print(
        f"  verdict: overhead {'meets' if overhead * 1000 <= TARGET_OVERHEAD_MS else 'MISSES'} its target; "
        f"follow CPU {'meets' if follow_percent < TARGET_FOLLOW_CPU_PERCENT else 'MISSES'} its target"
    )
    tree = f" --cli-pythonpath {args.cli_pythonpath}" if args.cli_pythonpath else ""
    print(f"rerun: .venv/bin/python benchmarks/bench_cli.py --runs {args.runs}{tree}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
