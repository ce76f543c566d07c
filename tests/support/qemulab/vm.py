"""Real QEMU processes, with no guest, to stream into.

`QemuVM` starts `qemu-system-x86_64` (or `qemu-storage-daemon`) with chains attached
(`qemulab.cmdline`), waits until its monitor answers, and always ends it: `quit` over QMP,
then SIGTERM, then SIGKILL, each bounded, and reaps it. It works as an async or a plain
context manager.

Monitors, all UNIX sockets in a short directory:

- `qmp_socket`: the `-qmp` monitor for the code under test. It serves ONE client at a time:
  the lab never stays connected to it.
- `extra_sockets`: more monitors (`-chardev socket` + `-mon`), each for another client (an
  agent, a `QemuWatcher`...). Every monitor receives every event.
- `control_socket`: the lab's own monitor (unless `control_monitor=False`), for readiness,
  `quit` and `execute`, so it never competes with the code under test.

The process is started with `setpriv --pdeathsig KILL` where available: if the test process
dies, QEMU dies with it. The signal follows the THREAD that started QEMU, so start VMs from a
thread that lives as long as they do (the main thread, the event loop's thread).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import shutil
import signal as _signal
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from qemu.qmp import ConnectError

from qemulab import qmp
from qemulab.cmdline import AttachedDisk, Disk, Monitor, VMKind, build_argv
from qemulab.errors import VMError, VMStartError
from qemulab.images import Chain
from qemulab.qmp import StrPath, qmp_execute_once, run_sync
from qemulab.tmpdirs import check_socket_path, remove_tree, short_tmpdir
from qemulab.tools import QEMU_STORAGE_DAEMON, QEMU_SYSTEM
from qemulab.watcher import QemuWatcher

__all__ = ["QemuVM", "QemuWatcher", "qmp_execute_once"]

#: Every VM started and not yet reaped, killed at interpreter exit if still running.
_LIVE: weakref.WeakSet[QemuVM] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for vm in list(_LIVE):
        vm.kill_now()


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll (and reap) until the process exited or `timeout` passed; whether it exited."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)


class QemuVM:
    """One QEMU process with chains attached and QMP monitors.

    `disks` are `Disk`s (a bare `Chain` is attached in `blockdev` mode); the k-th disk gets
    default names `disk{k}`, `drive{k}`, `vd{a+k}` (see `Disk`). After construction,
    `self.disks` holds the resolved `AttachedDisk`s and `argv` the command line.
    """

    def __init__(
        self,
        disks: Sequence[Disk | Chain] = (),
        *,
        kind: VMKind = "system",
        extra_monitors: int = 0,
        control_monitor: bool = True,
        socket_dir: StrPath | None = None,
        machine: str | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        ready_timeout: float = 15.0,
        die_with_parent: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if kind not in ("system", "storage-daemon"):
            raise ValueError(f"unknown kind {kind!r}")
        self.kind: VMKind = kind
        self.disks: list[AttachedDisk] = [
            (d if isinstance(d, Disk) else Disk(d)).resolve(k) for k, d in enumerate(disks)
        ]
        self.ready_timeout = ready_timeout
        self._owns_dir = socket_dir is None
        self.socket_dir = Path(socket_dir) if socket_dir is not None else short_tmpdir()
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        monitors: list[Monitor] = []
        main_path = check_socket_path(self.socket_dir / "qmp.sock")
        #: The monitor for the code under test (`-qmp`; `--monitor` for the storage daemon).
        self.qmp_socket = main_path
        monitors.append(Monitor("qmp0", main_path, main=kind == "system"))
        #: Extra monitors, one client each.
        self.extra_sockets = [
            check_socket_path(self.socket_dir / f"mon{n}.sock") for n in range(1, extra_monitors + 1)
        ]
        monitors += [Monitor(f"mon{n}", p) for n, p in enumerate(self.extra_sockets, start=1)]
        #: The lab's own monitor, or None.
        self.control_socket: Path | None = None
        if control_monitor:
            self.control_socket = check_socket_path(self.socket_dir / "ctl.sock")
            monitors.append(Monitor("ctl", self.control_socket))
        self.monitors = monitors
        default_binary = QEMU_SYSTEM if kind == "system" else QEMU_STORAGE_DAEMON
        #: The QEMU command line.
        self.argv = build_argv(
            kind,
            self.disks,
            monitors,
            binary=binary or default_binary,
            machine=machine,
            extra_args=extra_args,
        )
        self.log_path = self.socket_dir / "qemu.log"
        self._die_with_parent = die_with_parent
        self._env = dict(env) if env is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_cache: str | None = None
        self._closed = False

    # ---------------------------------------------------------------- state

    @property
    def pid(self) -> int | None:
        """The QEMU process id (None before the first start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Whether the process is running (reaps it if it has exited)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal), else None."""
        return self._proc.poll() if self._proc is not None else None

    def disk(self, name: str) -> AttachedDisk:
        """An attached disk by name (`disk0`...), drive id or device id."""
        for disk in self.disks:
            if name in (disk.name, disk.drive_id, disk.device_id):
                return disk
        raise KeyError(name)

    def stderr_text(self) -> str:
        """What QEMU wrote to stdout/stderr so far (kept after `stop` removed the files)."""
        if self._stderr_cache is not None:
            return self._stderr_cache
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ---------------------------------------------------------------- start

    def launch(self) -> None:
        """Start the process and return at once (not ready yet: see `wait_ready`)."""
        if self._closed:
            raise VMError("this VM was stopped and cleaned up; create a new one")
        if self.alive:
            raise VMError(f"QEMU already running (pid {self.pid})")
        argv = list(self.argv)
        setpriv = shutil.which("setpriv") if self._die_with_parent else None
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        self._stderr_cache = None
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=self._env,
            )
        _LIVE.add(self)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until QEMU answers on its monitor, then disconnect.

        The socket file appears BEFORE QEMU has parsed its `-blockdev`s, and a bad one makes
        QEMU exit: ready means a QMP client connected and ran `query-status`
        (`query-version` on the storage daemon). Raises `VMStartError` with QEMU's output if
        it exited or did not answer within `timeout` (default `ready_timeout`).
        """
        proc = self._require_proc()
        probe = self.control_socket or self.qmp_socket
        command = "query-status" if self.kind == "system" else "query-version"
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while True:
            if proc.poll() is not None:
                raise VMStartError(
                    f"QEMU exited with status {proc.returncode} before it was ready:\n"
                    f"{self.stderr_text().strip()}\ncommand line: {self.argv}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VMStartError(
                    f"QEMU (pid {proc.pid}) did not answer on {probe} in time:\n{self.stderr_text().strip()}"
                )
            if probe.exists():
                try:
                    await qmp.execute_once(probe, command, timeout=min(remaining, 2.0))
                except (ConnectError, TimeoutError, OSError, EOFError):
                    pass
                else:
                    if self.qmp_socket.exists():
                        return
            await asyncio.sleep(0.01)

    def wait_ready_sync(self, timeout: float | None = None) -> None:
        """`wait_ready` for synchronous code (also callable from inside a running loop)."""
        run_sync(lambda: self.wait_ready(timeout))

    async def start(self, timeout: float | None = None) -> Self:
        """Launch and wait until ready; on failure the process is ended before raising."""
        self.launch()
        try:
            await self.wait_ready(timeout)
        except BaseException:
            self._terminate_now()
            raise
        return self

    def start_sync(self, timeout: float | None = None) -> Self:
        """`start` for synchronous code."""
        self.launch()
        try:
            self.wait_ready_sync(timeout)
        except BaseException:
            self._terminate_now()
            raise
        return self

    async def restart(self, timeout: float | None = None) -> Self:
        """Start again on the same images and sockets (after a kill or stop without cleanup).

        QEMU replaces a socket file left behind by a killed predecessor.
        """
        if self.alive:
            await self._end_process(5.0)
        return await self.start(timeout)

    # ---------------------------------------------------------------- talk

    def _talk_socket(self) -> Path:
        return self.control_socket or self.qmp_socket

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 5.0
    ) -> object:
        """Run one QMP command on the lab's control monitor (the main one if there is none).

        Careful: `query-named-block-nodes` crashes QEMU 7.2 while a stream job is concluded
        and not yet dismissed.
        """
        return await qmp.execute_once(self._talk_socket(), command, arguments, timeout=timeout)

    def execute_sync(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 5.0
    ) -> object:
        """`execute` for synchronous code."""
        return qmp_execute_once(self._talk_socket(), command, arguments, timeout)

    async def node_names(self) -> list[str]:
        """Every named block node (`query-named-block-nodes` flat; see the warning of
        `execute`): ours, blkdebug ones, and QEMU's automatic `#blockNNN`."""
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        assert isinstance(nodes, list)
        return [str(node["node-name"]) for node in nodes]

    # ---------------------------------------------------------------- end

    def kill(self, sig: int = _signal.SIGKILL, *, wait: bool | None = None) -> int | None:
        """Send `sig` to QEMU. For SIGKILL and SIGTERM (or `wait=True`) wait up to 10 s for
        it to exit and return its status; else return None at once.

        After SIGKILL the socket files stay behind (QEMU had no chance to remove them).
        """
        proc = self._require_proc()
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(sig)
        if wait is None:
            wait = sig in (_signal.SIGKILL, _signal.SIGTERM)
        if not wait:
            return None
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired as exc:
            raise VMError(f"QEMU (pid {proc.pid}) still running 10 s after signal {sig}") from exc

    async def stop(self, timeout: float = 5.0) -> int | None:
        """End QEMU and clean up; safe to call twice, on a dead VM, or a never started one.

        `quit` over QMP first (bounded), then SIGTERM, then SIGKILL, each given `timeout`
        seconds; the process is always reaped. Then the socket directory (if the VM made it)
        is removed; `stderr_text()` stays available. Returns the exit status.
        """
        try:
            if self.alive:
                try:
                    await self.execute("quit", timeout=min(timeout, 2.0))
                    quit_sent = True
                except Exception:
                    quit_sent = False
                await self._end_process(timeout, graceful=quit_sent)
        finally:
            self._cleanup()
        return self.returncode

    def stop_sync(self, timeout: float = 5.0) -> int | None:
        """`stop` for synchronous code."""
        try:
            if self.alive:
                try:
                    self.execute_sync("quit", timeout=min(timeout, 2.0))
                    quit_sent = True
                except Exception:
                    quit_sent = False
                self._end_process_sync(timeout, graceful=quit_sent)
        finally:
            self._cleanup()
        return self.returncode

    def kill_now(self) -> None:
        """SIGKILL and reap at once, no questions asked (last-resort cleanup)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        _LIVE.discard(self)

    async def _end_process(self, timeout: float, *, graceful: bool = False) -> None:
        """Wait for an exit already asked for (`graceful`), then SIGTERM, then SIGKILL."""
        proc = self._require_proc()
        steps: tuple[int | None, ...] = (_signal.SIGTERM, _signal.SIGKILL)
        if graceful:
            steps = (None, *steps)
        for sig in steps:
            if sig is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            if await _wait_exit(proc, timeout if sig != _signal.SIGKILL else 10.0):
                break
        self.kill_now()

    def _end_process_sync(self, timeout: float, *, graceful: bool = False) -> None:
        proc = self._require_proc()
        for sig in (None, _signal.SIGTERM) if graceful else (_signal.SIGTERM,):
            if sig is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
                break
        self.kill_now()

    def _terminate_now(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.kill_now()

    def _cleanup(self) -> None:
        if self._proc is not None:
            self.kill_now()
        if self._closed:
            return
        self._stderr_cache = self.stderr_text()
        self._closed = True
        if self._owns_dir:
            remove_tree(self.socket_dir)
        else:
            for mon in self.monitors:
                mon.path.unlink(missing_ok=True)

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise VMError("QEMU was not started")
        return self._proc

    # ---------------------------------------------------------------- context managers

    async def __aenter__(self) -> Self:
        try:
            return await self.start()
        except BaseException:
            self._cleanup()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __enter__(self) -> Self:
        try:
            return self.start_sync()
        except BaseException:
            self._cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {self.returncode}" if self._proc else "new"
        return f"<QemuVM {self.kind} pid={self.pid} {state} {self.qmp_socket}>"
