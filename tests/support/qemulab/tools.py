"""Running the QEMU command-line tools.

One place that knows the binaries' names (overridable through environment variables, for a
QEMU built elsewhere) and how to run them: a bounded time, captured output, and a `ToolError`
that carries QEMU's own message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Collection, Sequence

from qemulab.errors import ToolError

#: `qemu-img`; override with QEMULAB_QEMU_IMG.
QEMU_IMG = os.environ.get("QEMULAB_QEMU_IMG", "qemu-img")
#: `qemu-io`; override with QEMULAB_QEMU_IO.
QEMU_IO = os.environ.get("QEMULAB_QEMU_IO", "qemu-io")
#: `qemu-system-x86_64`; override with QEMULAB_QEMU_SYSTEM.
QEMU_SYSTEM = os.environ.get("QEMULAB_QEMU_SYSTEM", "qemu-system-x86_64")
#: `qemu-storage-daemon`; override with QEMULAB_QEMU_STORAGE_DAEMON.
QEMU_STORAGE_DAEMON = os.environ.get("QEMULAB_QEMU_STORAGE_DAEMON", "qemu-storage-daemon")

#: Default time limit for one tool run, in seconds.
DEFAULT_TIMEOUT = 300.0


def missing_tools() -> list[str]:
    """The QEMU binaries the lab needs that are not on PATH (empty when all are there)."""
    return [
        tool for tool in (QEMU_IMG, QEMU_IO, QEMU_SYSTEM, QEMU_STORAGE_DAEMON) if shutil.which(tool) is None
    ]


def qemu_available() -> bool:
    """Whether every QEMU binary the lab uses is installed."""
    return not missing_tools()


def run_tool(
    argv: Sequence[str],
    *,
    ok_codes: Collection[int] = (0,),
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run one tool to completion and return its result.

    Raises `ToolError` when the exit code is not in `ok_codes` or the run takes longer than
    `timeout` seconds (the process is killed and reaped first).
    """
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise ToolError(argv, None, stderr) from exc
    if done.returncode not in ok_codes:
        raise ToolError(argv, done.returncode, done.stderr or done.stdout)
    return done


def run_tools_parallel(
    argvs: Sequence[Sequence[str]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Run several tool invocations at once; raise `ToolError` for the first that failed.

    Every process is waited for (or killed and reaped at the deadline) before this returns,
    whatever happens, so none is left behind.
    """
    procs: list[tuple[Sequence[str], subprocess.Popen[str]]] = []
    try:
        for argv in argvs:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append((argv, proc))
        failure: ToolError | None = None
        deadline = time.monotonic() + timeout
        for argv, proc in procs:
            try:
                _, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
                failure = failure or ToolError(argv, None, stderr)
                continue
            if proc.returncode != 0:
                failure = failure or ToolError(argv, proc.returncode, stderr)
        if failure is not None:
            raise failure
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
