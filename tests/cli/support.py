"""Helpers for the CLI tests: running `blockpull`, and a lab of one QEMU with one disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qemulab import AttachedDisk, Chain, QemuVM, backing_chain_info, check, compare


def cli_argv() -> list[str]:
    """How to start `blockpull`: the console script of this environment if it is installed."""
    script = Path(sys.executable).parent / "blockpull"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "blockpull.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BLOCKPULL_DEBUG", None)
    env.update(extra)
    return env


@dataclass
class Ran:
    """A finished `blockpull` run."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("blockpull: error: ")]

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode} after {self.elapsed:.2f}s\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


def run_cli(*args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None) -> Ran:
    """Run `blockpull ARGS` to completion through pipes."""
    argv = [*cli_argv(), *args]
    started = time.monotonic()
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else cli_env(),
    )
    return Ran(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def assert_one_error_line(ran: Ran, *fragments: str) -> str:
    """Failure is reported as ONE `blockpull: error: ...` line on stderr, no traceback."""
    assert "Traceback" not in ran.stderr, str(ran)
    assert len(ran.error_lines) == 1, str(ran)
    line = ran.error_lines[0]
    for fragment in fragments:
        assert fragment in line, str(ran)
    return line


@dataclass
class Lab:
    """One QEMU with one disk (a qcow2 chain, blockdev nodes `disk0-fmt0` (base) .. top)."""

    vm: QemuVM
    chain: Chain
    disk: AttachedDisk

    @property
    def socket(self) -> str:
        return str(self.vm.qmp_socket)

    @property
    def top(self) -> str:
        return self.disk.top

    def node(self, index: int) -> str:
        """Format node of layer `index` (0 = base, -1 = top)."""
        return self.disk.format_nodes[index]

    def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """A command on the lab's own monitor (never the one the CLI uses)."""
        return self.vm.execute_sync(command, arguments)

    def jobs(self) -> list[dict[str, Any]]:
        result = self.execute("query-jobs")
        assert isinstance(result, list)
        return result

    def wait_job(
        self, job_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        """Poll `query-jobs` on the lab's monitor until the job satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            job = next((j for j in self.jobs() if j["id"] == job_id), None)
            if job is not None and predicate(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not as expected within {timeout}s: {job}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut QEMU down cleanly (`quit`: it flushes the images), before exact comparisons."""
        self.vm.stop_sync()

    def assert_intact_and_unchanged(self) -> None:
        """Chain consistent, guest data as before (QEMU must be stopped first)."""
        assert not self.vm.alive
        check(self.chain.top)  # raises ImageCorrupt on corruption
        assert compare(self.chain.top, self.chain.reference or ""), "disk content changed"

    def backing_names(self) -> list[str]:
        """Backing names recorded in the headers, top first (QEMU must be stopped first)."""
        return [i.backing_filename for i in backing_chain_info(self.chain.top) if i.backing_filename]


#: A bandwidth that makes a `slow_lab` pull last about two seconds.
SLOW = "24Mi"


class Running:
    """`blockpull ARGS` started in the background through pipes, read line by line."""

    def __init__(self, *args: str) -> None:
        self.argv = [*cli_argv(), *args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._changed = threading.Condition()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], into: list[str]) -> None:
        for line in stream:
            with self._changed:
                into.append(line)
                self._changed.notify_all()

    def wait_for_stderr(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first stderr line matching `pattern` (a regex), waiting for it to come."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._stderr:
                    found = regex.search(line)
                    if found:
                        return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no stderr line matching {pattern!r}: {''.join(self._stderr)}")
                self._changed.wait(min(remaining, 0.1))

    def send_signal(self, sig: int) -> float:
        """Signal the process; returns when (monotonic) it was sent."""
        self.proc.send_signal(sig)
        return time.monotonic()

    def finish(self, timeout: float = 30.0) -> Ran:
        """Wait for the exit; everything it printed."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            for reader in self._readers:
                reader.join(5)
        return Ran(
            self.argv,
            self.proc.returncode,
            "".join(self._stdout),
            "".join(self._stderr),
            time.monotonic() - self.started,
        )
