"""A private libvirtd for tests: its own mount namespace, sockets, logs and pid files.

Nothing here touches a system libvirtd (none runs on these machines, and another engineer's
test run may have its own private one). The recipe:

- `unshare --mount --propagation private` gives the daemons a mount namespace of their own,
  with tmpfs over the directories a root libvirtd hard-codes (`/run/libvirt`,
  `/var/lib/libvirt`, `/var/cache/libvirt`) and bind mounts of the lab's own directories over
  `/etc/libvirt` (our `qemu.conf`) and `/var/log/libvirt` (so the tests read domain logs at a
  path of the lab's). The host's mount table is never changed.
- `qemu.conf`: `user`/`group` root (otherwise every domain start re-probes QEMU for ~40 s:
  /dev/kvm is root-only here) and `cgroup_controllers = [ ]` (otherwise libvirt creates
  cgroups at the root of every hierarchy).
- A `sleep` process anchors the namespace: libvirtd can be stopped (SIGTERM) and started
  again inside the same namespace, exactly like a libvirtd restart on a host, while its QEMUs
  and virtlogd go on.
- libvirtd listens on `<dir>/sock/libvirt-sock` only; the URI is
  `qemu+unix:///system?socket=<dir>/sock/libvirt-sock`.

Everything is stopped by pid: domains' QEMUs, libvirtd, virtlogd, the anchor. The directory
is removed too, unless VIRTLAB_KEEP is set (then `libvirtd.log` keeps libvirtd's warnings and
its QEMU monitor traffic, for a post-mortem).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from qemulab.errors import LabError
from qemulab.tmpdirs import remove_tree, short_tmpdir

#: How long libvirtd may take to answer after a (re)start: the first start probes QEMU (~10 s).
START_TIMEOUT = 60.0

_QEMU_CONF = """\
# Written by virtlab: a private test daemon.
user = "root"
group = "root"
cgroup_controllers = [ ]
"""

_LIBVIRTD_CONF = """\
# Written by virtlab: a private test daemon, reachable through its UNIX socket only.
unix_sock_dir = "{sock}"
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_filters = "1:qemu.qemu_monitor"
log_outputs = "1:file:{log}"
"""

_VIRTLOGD_CONF = """\
# Written by virtlab.
log_outputs = "3:file:{log}"
"""

#: The directories a root libvirtd hard-codes, each replaced by a tmpfs in the namespace.
_PRIVATE_TMPFS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt")


class DaemonError(LabError):
    """The private libvirtd did not start, answer or stop as asked."""


def libvirtd_available() -> bool:
    """Whether libvirtd, virtlogd, virsh and unshare/nsenter are installed."""
    return all(shutil.which(tool) for tool in ("libvirtd", "virtlogd", "virsh", "unshare", "nsenter"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.02)
    return not _pid_alive(pid)


def _stop_pid(pid: int | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; returns when the process is gone."""
    if pid is None or not _pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class LibvirtDaemon:
    """A private libvirtd (plus virtlogd) in its own mount namespace, under `directory`.

    `start()` / `stop()` / `restart()`; `terminate()` stops libvirtd alone (SIGTERM) and
    `start_libvirtd()` brings it back, as a host's service manager would; `uri` is what a
    client connects to. `close()` stops everything it started, domains included.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else short_tmpdir("bpv-")
        self._owns_directory = directory is None
        self.sock_dir = self.directory / "sock"
        self.etc_dir = self.directory / "etc"
        self.log_dir = self.directory / "log"
        self.socket = self.sock_dir / "libvirt-sock"
        self.libvirtd_log = self.directory / "libvirtd.log"
        self.libvirtd_pid_file = self.directory / "libvirtd.pid"
        self.virtlogd_pid_file = self.directory / "virtlogd.pid"
        self._anchor: subprocess.Popen[bytes] | None = None

    # --- what clients need ---------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def libvirtd_pid(self) -> int | None:
        pid = _read_pid(self.libvirtd_pid_file)
        return pid if pid is not None and _pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.libvirtd_pid is not None

    def domain_log(self, name: str) -> Path:
        """The domain's log file (`/var/log/libvirt/qemu/NAME.log` inside the namespace)."""
        return self.log_dir / "qemu" / f"{name}.log"

    def qemu_pids(self) -> dict[str, int]:
        """The running domains' QEMU pids by domain name, from libvirt's own pid files."""
        run = self.namespace_path(Path("/run/libvirt/qemu"))
        found: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for pidfile in run.glob("*.pid"):
                if pidfile.stem == "driver":  # the QEMU driver's own lock file
                    continue
                pid = _read_pid(pidfile)
                if pid is not None and _pid_alive(pid):
                    found[pidfile.stem] = pid
        return found

    def namespace_path(self, path: Path) -> Path:
        """Where the host sees `path` of the daemons' mount namespace."""
        if self._anchor is None:
            raise DaemonError("the namespace is not set up")
        return Path(f"/proc/{self._anchor.pid}/root") / path.relative_to("/")

    # --- set-up --------------------------------------------------------------------------

    def _write_config(self) -> None:
        for d in (self.sock_dir, self.etc_dir, self.log_dir / "qemu"):
            d.mkdir(parents=True, exist_ok=True)
        (self.etc_dir / "qemu.conf").write_text(_QEMU_CONF)
        (self.etc_dir / "libvirtd.conf").write_text(
            _LIBVIRTD_CONF.format(sock=self.sock_dir, log=self.libvirtd_log)
        )
        (self.etc_dir / "virtlogd.conf").write_text(
            _VIRTLOGD_CONF.format(log=self.directory / "virtlogd.log")
        )
        (self.etc_dir / "libvirt.conf").write_text("")

    def _start_namespace(self) -> None:
        mounts = [f"mount -t tmpfs -o mode=0755 tmpfs {d}" for d in _PRIVATE_TMPFS]
        script = " && ".join(
            [
                *(f"mkdir -p {d}" for d in _PRIVATE_TMPFS),
                *mounts,
                f"mount --bind {self.etc_dir} /etc/libvirt",
                "mkdir -p /var/log/libvirt",
                f"mount --bind {self.log_dir} /var/log/libvirt",
                # The anchor: holds the namespace while daemons come and go.
                "exec sleep infinity",
            ]
        )
        self._anchor = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # Ready when the anchor runs `sleep` with the mounts in place.
        deadline = time.monotonic() + 10.0
        marker = self.namespace_path(Path("/etc/libvirt/qemu.conf"))
        while time.monotonic() < deadline:
            if self._anchor.poll() is not None:
                err = self._anchor.stderr.read().decode() if self._anchor.stderr else ""
                raise DaemonError(f"setting up the mount namespace failed: {err.strip()}")
            with contextlib.suppress(OSError):
                if marker.read_text() == _QEMU_CONF:
                    return
            time.sleep(0.02)
        raise DaemonError("the mount namespace was not ready within 10 s")

    def _in_namespace(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        if self._anchor is None:
            raise DaemonError("the namespace is not set up")
        return subprocess.run(
            ["nsenter", f"--target={self._anchor.pid}", "--mount", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def run_in_namespace(self, argv: list[str], timeout: float = 30.0) -> str:
        """Run a command in the daemons' mount namespace; its stdout, or `DaemonError`."""
        done = self._in_namespace(argv, timeout)
        if done.returncode != 0:
            raise DaemonError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def mount_tmpfs(self, path: Path, size: str) -> Path:
        """A tmpfs of `size` at `path` as the daemons (and the QEMUs they start later) see it.

        The host does not see it at `path` (the namespace is private): the returned path is
        where the host reads and writes it. Unmounted with the namespace.
        """
        path.mkdir(parents=True, exist_ok=True)
        self.run_in_namespace(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
        return self.namespace_path(path)

    def start_virtlogd(self) -> None:
        self.run_in_namespace(["virtlogd", "-d", "--pid-file", str(self.virtlogd_pid_file)])

    def start_libvirtd(self, timeout: float = START_TIMEOUT) -> None:
        """Start libvirtd in the namespace; return once it answers on its socket."""
        if self.running:
            raise DaemonError("libvirtd is already running")
        self.socket.unlink(missing_ok=True)
        self.run_in_namespace(
            [
                "libvirtd",
                "-d",
                "--config",
                str(self.etc_dir / "libvirtd.conf"),
                "--pid-file",
                str(self.libvirtd_pid_file),
            ]
        )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            done = subprocess.run(
                ["virsh", "-c", self.uri, "version"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            if done.returncode == 0:
                return
            last = done.stderr.strip()
            if not self.running and self.libvirtd_pid_file.exists():
                break
            time.sleep(0.1)
        raise DaemonError(f"libvirtd did not answer within {timeout:.0f} s: {last}; see {self.libvirtd_log}")

    def start(self) -> LibvirtDaemon:
        """Namespace, virtlogd, libvirtd; returns when libvirtd answers."""
        self._write_config()
        try:
            self._start_namespace()
            self.start_virtlogd()
            self.start_libvirtd()
        except BaseException:
            self.close()
            raise
        return self

    # --- restarts and the end ------------------------------------------------------------

    def terminate(self, timeout: float = 15.0) -> None:
        """SIGTERM libvirtd and wait until it is gone (its domains keep running)."""
        pid = self.libvirtd_pid
        if pid is None:
            return
        _stop_pid(pid, timeout)

    def hang(self) -> int:
        """SIGSTOP libvirtd (it keeps its socket, answers nothing); `unhang` resumes it."""
        pid = self.libvirtd_pid
        if pid is None:
            raise DaemonError("libvirtd is not running")
        os.kill(pid, signal.SIGSTOP)
        return pid

    def unhang(self) -> None:
        pid = self.libvirtd_pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def restart(self) -> None:
        """Stop libvirtd (SIGTERM) and start it again in the same namespace."""
        self.terminate()
        self.start_libvirtd()

    def close(self) -> None:
        """Stop everything this lab started: QEMUs, libvirtd, virtlogd, the namespace."""
        qemus = self.qemu_pids() if self._anchor is not None else {}
        with contextlib.suppress(ProcessLookupError):
            pid = self.libvirtd_pid
            if pid is not None:
                os.kill(pid, signal.SIGCONT)  # a hung daemon cannot act on SIGTERM
        for pid in qemus.values():
            _stop_pid(pid, 5.0)
        _stop_pid(self.libvirtd_pid)
        _stop_pid(_read_pid(self.virtlogd_pid_file))
        if self._anchor is not None:
            self._anchor.kill()
            self._anchor.wait(10.0)
            if self._anchor.stderr is not None:
                self._anchor.stderr.close()
            self._anchor = None
        if self._owns_directory and not os.environ.get("VIRTLAB_KEEP"):
            remove_tree(self.directory)

    def __enter__(self) -> LibvirtDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
