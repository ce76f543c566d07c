"""The BlockPull demo: a BlockPull object flattens a live QEMU disk, and qemu-img proves it.

Everything is real and runs on this machine, no cluster needed:

1. a three-image qcow2 chain with known data (template <- mid <- web-1-root), plus a
   reference image holding what the guest sees;
2. QEMU (no guest: `-M none`) with the chain attached and a QMP socket where the agent
   looks for VM `web-1` of namespace `vms`;
3. the Kubernetes API stand-in (`python -m testapiserver`) with the BlockPull CRD;
4. the node agent (`blockpull-agent`) of node `demo-node`;
5. `kubectl apply` of a throttled BlockPull (deploy/samples/full-pull.yaml with a bandwidth);
6. `kubectl get -w` until it Completed, `kubectl wait`, its status and its Events;
7. `qemu-img`: the disk has no backing file any more, shows the guest the same bytes as the
   reference, and is clean.

Everything it started is stopped and its work directory removed when it ends: after success,
a failed step (exit status 1), Ctrl-C (130) or SIGTERM (143). Usage:

    bash scripts/demo.sh                      # set up the machine if needed, then run this
    .venv/bin/python scripts/demo.py --keep   # leave the API and the agent up until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType

from qemulab import Chain, QemuVM, backing_chain, check, compare, make_chain, short_tmpdir
from qemulab.tools import QEMU_IMG, QEMU_IO, QEMU_SYSTEM

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "blockpull.dev_blockpulls.yaml"
NAMESPACE = "vms"
VM_NAME = "web-1"
NODE = "demo-node"
OBJECT = "flatten-web-1-root"
LAYERS = ["template", "mid", "web-1-root"]
MiB = 1 << 20
DISK_SIZE = 256 * MiB
STEPS = 7
#: How long one step may wait for something (a process to be ready, the pull to end).
STEP_TIMEOUT = 120.0
#: Lines of each log shown when a step fails.
LOG_TAIL = 40

_TTY = sys.stdout.isatty()
BOLD = "\033[1m" if _TTY else ""
DIM = "\033[2m" if _TTY else ""
RESET = "\033[0m" if _TTY else ""


class DemoError(Exception):
    """A step failed; the message says what went wrong."""


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop what runs, clean up, exit 128+signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------- signals
#
# The handler only records the signal; `checkpoint()` raises `Interrupted` at points where
# everything started so far is recorded for `cleanup`. An exception raised straight from a
# handler could land between fork and bookkeeping (inside `subprocess.Popen`, say) and leave a
# process nobody stops. Waits poll at least every 0.2 s, so an interrupt still acts at once.

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []
_stopping = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if _stopping:
        # os.write, not print: print could be re-entered while the main code is printing.
        msg = f"({signal.Signals(signum).name}: already stopping everything, one moment)\n"
        with contextlib.suppress(OSError):
            os.write(sys.stderr.fileno(), msg.encode())


def handle_signals() -> None:
    for sig in _SIGNALS:
        signal.signal(sig, _on_signal)


def stopping() -> None:
    """From here on a signal no longer interrupts anything (the clean-up runs to its end)."""
    global _stopping  # noqa: PLW0603 - one process, one clean-up
    _stopping = True


def interrupted_by() -> int | None:
    """The first signal received, if any."""
    return _received[0] if _received else None


def checkpoint() -> None:
    """Raise `Interrupted` if a signal arrived (only call where nothing started is unrecorded)."""
    if _received and not _stopping:
        raise Interrupted(_received[0])


# --------------------------------------------------------------------------- output


def header(number: int, title: str) -> None:
    checkpoint()
    print(f"\n{BOLD}{number}/{STEPS} {title}{RESET}", flush=True)


def note(text: str) -> None:
    checkpoint()
    print(f"{DIM}# {text}{RESET}", flush=True)


def shown(command: str) -> None:
    """Print a command the way a user would type it."""
    checkpoint()
    print(f"{BOLD}${RESET} {command}", flush=True)


def grep(pattern: str) -> tuple[str, Callable[[str], str]]:
    """Keep the lines matching `pattern`, shown as `| grep -E PATTERN`."""
    regex = re.compile(pattern)
    return f"grep -E {shlex.quote(pattern)}", lambda text: "".join(
        line for line in text.splitlines(keepends=True) if regex.search(line)
    )


def from_line(start: str) -> tuple[str, Callable[[str], str]]:
    """Keep everything from the first line that is `start`, shown as `| sed -n '/^START$/,$p'`."""

    def cut(text: str) -> str:
        lines = text.splitlines(keepends=True)
        first = next((i for i, line in enumerate(lines) if line.rstrip("\n") == start), len(lines))
        return "".join(lines[first:])

    return f"sed -n '/^{start}$/,$p'", cut


#: What `qemu-img info --backing-chain` says about the chain, without the format details.
INFO_LINES = grep("^(image|disk size|backing file):")


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) or "(empty)"


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(
    argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None, pipe_stdout: bool = False
) -> subprocess.Popen[bytes]:
    """Start a background process in its own session (Ctrl-C reaches only the demo, which then
    stops it in order), killed by the kernel should the demo itself die (`setpriv --pdeathsig`)."""
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
    with log.open("ab") as out:
        return subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else out,
            stderr=out,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 15.0
) -> None:
    """Send `sig`, wait up to `timeout` s, then SIGKILL; always reaps the process."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def read_line(proc: subprocess.Popen[bytes], buffer: bytearray, deadline: float) -> str | None:
    """The next line `proc` writes to its stdout pipe; None once it closed it.

    Reads the file descriptor directly (no Python buffering), so `select` never waits while a
    line already sits in a buffer. Raises DemoError at `deadline`.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while b"\n" not in buffer:
        checkpoint()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DemoError(f"timed out waiting for output of pid {proc.pid}")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if buffer:
                line = buffer.decode(errors="replace")
                buffer.clear()
                return line
            return None
        buffer += chunk
    first, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return first.decode(errors="replace")


def eventually(probe: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        checkpoint()
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- the demo


class Demo:
    """The demo's state: what it started, so that `cleanup` can stop exactly that."""

    def __init__(self, *, bandwidth: str, keep: bool) -> None:
        self.bandwidth = bandwidth
        self.keep = keep
        self.workdir: Path | None = None
        self.chain: Chain | None = None
        self.vm: QemuVM | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.watch: subprocess.Popen[bytes] | None = None
        self.started = time.monotonic()

    # paths, all in the work directory (short: it also holds the UNIX sockets)

    @property
    def wd(self) -> Path:
        assert self.workdir is not None
        return self.workdir

    @property
    def kubeconfig(self) -> Path:
        return self.wd / "kubeconfig"

    @property
    def agent_log(self) -> Path:
        return self.wd / "agent.log"

    @property
    def api_log(self) -> Path:
        return self.wd / "apiserver.log"

    @property
    def socket_template(self) -> str:
        return f"{self.wd}/sockets/{{namespace}}/{{vm}}.qmp"

    # helpers

    def kube_env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def run(
        self,
        argv: Sequence[str],
        *,
        display: str | None = None,
        only: tuple[str, Callable[[str], str]] | None = None,
        cwd: Path | None = None,
        input: str | None = None,
        timeout: float = STEP_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Show a command (`display`, default `argv`), run it, and print its output; DemoError
        when it fails. `only=(pipe, cut)` prints `cut(output)`, the command shown as `... | pipe`."""
        command = display or shlex.join(argv)
        if only is not None:
            command += f" | {only[0]}"
        shown(command)
        try:
            done = subprocess.run(
                list(argv),
                cwd=cwd,
                env=self.kube_env(),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DemoError(f"`{command}` did not finish within {timeout:g} s") from None
        out = only[1](done.stdout) if only is not None else done.stdout
        print(out, end="" if out.endswith("\n") or not out else "\n")
        if done.stderr:
            print(done.stderr, end="" if done.stderr.endswith("\n") else "\n", file=sys.stderr)
        sys.stdout.flush()
        checkpoint()  # a Ctrl-C in a terminal also ends the command itself
        if done.returncode != 0:
            raise DemoError(f"`{command}` exited with status {done.returncode}")
        return done

    def kubectl(
        self,
        *args: str,
        only: tuple[str, Callable[[str], str]] | None = None,
        input: str | None = None,
        display: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl --kubeconfig <ours> ARGS`, shown as `kubectl ARGS` (KUBECONFIG is exported)."""
        argv = ["kubectl", f"--kubeconfig={self.kubeconfig}", *args]
        return self.run(argv, display=display or shlex.join(["kubectl", *args]), only=only, input=input)

    # the steps

    def main(self) -> None:
        self.workdir = short_tmpdir("bpdemo-")
        print(f"{BOLD}BlockPull demo{RESET}: flatten a running VM's disk with a Kubernetes object.")
        print(f"work dir: {self.wd} (removed at the end)", flush=True)
        self.build_chain()
        self.start_qemu()
        self.start_api()
        self.start_agent()
        self.apply()
        self.follow()
        self.prove()
        print(
            f"\n{BOLD}Done in {time.monotonic() - self.started:.0f} s{RESET}: the VM's disk no longer "
            "needs template.qcow2 or mid.qcow2, and the guest never saw a difference.",
            flush=True,
        )
        if self.keep:
            self.linger()

    def build_chain(self) -> None:
        header(1, f"building a {len(LAYERS)}-image qcow2 chain: " + " <- ".join(LAYERS))
        images = self.wd / "images"
        self.chain = make_chain(images, layers=len(LAYERS), size=DISK_SIZE, names=LAYERS)
        note(
            f"{DISK_SIZE // MiB} MiB disk; each image holds its own known data, the VM writes to "
            f"{self.chain.top.name}; reference.qcow2 is a standalone copy of what the guest sees"
        )
        shown(f"cd {images}")
        self.run(["qemu-img", "info", "--backing-chain", self.chain.top.name], cwd=images, only=INFO_LINES)

    def start_qemu(self) -> None:
        header(2, f"starting QEMU: VM {VM_NAME} with the chain attached")
        assert self.chain is not None
        sock = self.wd / "sockets" / NAMESPACE / f"{VM_NAME}.qmp"
        sock.parent.mkdir(parents=True)
        monitor = [
            "-chardev",
            f"socket,id=bp,path={sock},server=on,wait=off",
            "-mon",
            "chardev=bp,mode=control",
        ]
        self.vm = QemuVM([self.chain], socket_dir=self.wd / "qemu", extra_args=monitor)
        shown(
            "qemu-system-x86_64 -M none -nodefaults -display none \\\n"
            f"    -blockdev ...{' -blockdev ...'.join(p.name for p in self.chain.images)} \\\n"
            f"    {shlex.join(monitor)} &"
        )
        self.vm.start_sync()
        note(f"QEMU (pid {self.vm.pid}) runs with no guest; the agent will talk to it on {sock}")
        note(f"QEMU log: {self.vm.log_path}")

    def start_api(self) -> None:
        header(3, "starting the Kubernetes API (a stand-in: no cluster needed) with the BlockPull CRD")
        crd = CRD.relative_to(REPO)
        argv = [sys.executable, "-m", "testapiserver", "--port", "0", "--kubeconfig", str(self.kubeconfig)]
        argv += ["--crd", str(CRD)]
        shown(f"python -m testapiserver --port 0 --kubeconfig {self.kubeconfig} --crd {crd} &")
        self.api = spawn(argv, log=self.api_log, pipe_stdout=True)
        url = read_line(self.api, bytearray(), time.monotonic() + 30)
        if not url or not self.kubeconfig.exists():
            raise DemoError(f"the API stand-in exited with status {self.api.wait(5)} before it was ready")
        note(f"API stand-in (pid {self.api.pid}) serves {url.strip()}; log: {self.api_log}")
        shown(f"export KUBECONFIG={self.kubeconfig}")
        self.kubectl("create", "namespace", NAMESPACE)

    def start_agent(self) -> None:
        header(4, f"starting the BlockPull agent of node {NODE}")
        port = free_port()
        settings = {
            "NODE_NAME": NODE,
            "BLOCKPULL_SOCKET_TEMPLATE": self.socket_template,
            "BLOCKPULL_LIVENESS_PORT": str(port),
            "BLOCKPULL_METRICS_PORT": str(free_port()),
            "BLOCKPULL_STATUS_INTERVAL": "0.5",
            "BLOCKPULL_POLL_INTERVAL": "0.5",
        }
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("BLOCKPULL_", "KUBERNETES_"))}
        env = {**inherited, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", **settings}
        shown(
            " \\\n    ".join([*(f"{k}={shlex.quote(v)}" for k, v in settings.items()), "blockpull-agent &"])
        )
        script = Path(sys.executable).with_name("blockpull-agent")
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "blockpull.agent"]
        self.agent = spawn(argv, log=self.agent_log, env=env)
        healthz = f"http://127.0.0.1:{port}/healthz"
        agent = self.agent

        def ready() -> bool:
            if agent.poll() is not None:
                raise DemoError(f"the agent exited with status {agent.returncode}")
            try:
                with urllib.request.urlopen(healthz, timeout=1) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        eventually(ready, timeout=30, what=f"the agent's liveness endpoint {healthz}")
        note(f"agent (pid {self.agent.pid}) is live: GET {healthz} -> 200; log: {self.agent_log}")

    def manifest(self) -> str:
        assert self.chain is not None
        socket_path = self.socket_template.format(namespace=NAMESPACE, vm=VM_NAME)
        spec = [
            (f"nodeName: {NODE}", "only this node's agent acts on it"),
            (f"vm: {VM_NAME}", f"QMP socket: {socket_path}"),
            (f"bandwidth: {self.bandwidth}", "bytes/s: slow enough to watch"),
            (f"disk: {self.chain.top}", "the active image"),
        ]
        width = max(len(field) for field, _ in spec[:-1]) + 2
        lines = [
            "apiVersion: blockpull.dev/v1alpha1",
            "kind: BlockPull",
            "metadata:",
            f"  name: {OBJECT}",
            f"  namespace: {NAMESPACE}",
            "spec:",
            *(
                f"  {field.ljust(width) if len(field) < width else field + '  '}# {comment}"
                for field, comment in spec
            ),
        ]
        return "\n".join(lines) + "\n"

    def apply(self) -> None:
        header(5, "creating the BlockPull (like deploy/samples/full-pull.yaml, throttled)")
        manifest = self.manifest()
        self.kubectl("apply", "-f", "-", display=f"kubectl apply -f - <<EOF\n{manifest}EOF", input=manifest)

    def follow(self) -> None:
        header(6, "watching it until it Completed")
        argv = ["kubectl", f"--kubeconfig={self.kubeconfig}", "get", "bp", "-n", NAMESPACE, "-w"]
        shown(f"kubectl get bp -n {NAMESPACE} -w")
        self.watch = spawn(argv, log=self.wd / "watch.log", env=self.kube_env(), pipe_stdout=True)
        phase = None
        buffer = bytearray()
        deadline = time.monotonic() + STEP_TIMEOUT
        while phase is None:
            line = read_line(self.watch, buffer, deadline)
            if line is None:
                checkpoint()
                raise DemoError(f"kubectl get -w ended: {tail(self.wd / 'watch.log', 5)}")
            print(line, flush=True)
            fields = line.split()
            if fields and fields[0] == OBJECT:
                phase = next((f for f in fields if f in ("Completed", "Failed")), None)
        stop_process(self.watch)
        note("(stopped watching)")
        if phase == "Failed":
            self.kubectl("describe", "bp", "-n", NAMESPACE, OBJECT)
            raise DemoError(
                f"the BlockPull failed (see its status and Events above; agent log: {self.agent_log})"
            )
        self.kubectl(
            "wait",
            "-n",
            NAMESPACE,
            "--for=condition=Completed",
            f"bp/{OBJECT}",
            f"--timeout={STEP_TIMEOUT:.0f}s",
        )
        note("its status: phase, progress, conditions, and the images the disk no longer needs")
        self.kubectl("get", "bp", "-n", NAMESPACE, OBJECT, "-o", "yaml", only=from_line("status:"))
        note("and its story, as the agent told it in Events")
        self.kubectl("describe", "bp", "-n", NAMESPACE, OBJECT, only=from_line("Events:"))

    def prove(self) -> None:
        header(7, "checking the disk with qemu-img")
        assert self.chain is not None and self.vm is not None and self.chain.reference is not None
        note("stopping QEMU (QMP quit) so that qemu-img may open the image without -U")
        self.vm.stop_sync()
        images = self.chain.directory
        top, reference = self.chain.top.name, self.chain.reference.name
        shown(f"cd {images}")
        self.run(["qemu-img", "info", "--backing-chain", top], cwd=images, only=INFO_LINES)
        if backing_chain(self.chain.top) != [str(self.chain.top)]:
            raise DemoError(f"{top} still has a backing file: {backing_chain(self.chain.top)}")
        self.run(["qemu-img", "compare", top, reference], cwd=images)
        if not compare(self.chain.top, self.chain.reference):
            raise DemoError(f"{top} differs from {reference}")
        self.run(["qemu-img", "check", top], cwd=images)
        if not check(self.chain.top).clean:
            raise DemoError(f"qemu-img check found problems in {top}")
        note(f"{top} stands alone, holds exactly what the guest saw before, and is clean")

    def linger(self) -> None:
        note("--keep: the API stand-in and the agent keep running (QEMU was stopped for the checks)")
        shown(f"export KUBECONFIG={self.kubeconfig}")
        note("try: kubectl get bp -A; kubectl get events -n vms; press Ctrl-C to stop everything")
        while interrupted_by() is None:
            time.sleep(0.2)

    # the end

    def show_logs(self) -> None:
        """The end of each log, for a failed run (the work directory is removed after)."""
        if self.workdir is None:
            return
        for name, path in (("agent", self.agent_log), ("API stand-in", self.api_log)):
            if path.exists():
                print(f"\n----- {name} log ({path}), last lines -----\n{tail(path)}", file=sys.stderr)
        if self.vm is not None and self.vm.stderr_text().strip():
            print(f"\n----- QEMU output -----\n{self.vm.stderr_text().strip()}", file=sys.stderr)

    def cleanup(self) -> None:
        """Stop everything started, newest first, and remove the work directory."""
        stopped: list[str] = []
        problems: list[str] = []
        steps: list[tuple[str, Callable[[], object], int | None]] = [
            ("kubectl get -w", lambda: stop_process(self.watch), self.watch.pid if self.watch else None),
            ("the agent", lambda: stop_process(self.agent), self.agent.pid if self.agent else None),
            ("QEMU", lambda: self.vm.stop_sync() if self.vm else None, self.vm.pid if self.vm else None),
            ("the API stand-in", lambda: stop_process(self.api), self.api.pid if self.api else None),
        ]
        for name, stop, pid in steps:
            if pid is None:
                continue
            began = time.monotonic()
            try:
                stop()
            except Exception as exc:
                problems.append(f"stopping {name} (pid {pid}): {exc}")
            else:
                took = time.monotonic() - began
                stopped.append(f"{name} (pid {pid}{f', {took:.1f} s' if took >= 1 else ''})")
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.workdir.exists():
                problems.append(f"could not remove {self.workdir}")
        what = f"stopped {', '.join(stopped)}" if stopped else "nothing was running"
        removed = f"; removed {self.workdir}" if self.workdir is not None else ""
        print(f"\ncleaned up: {what}{removed}", flush=True)
        for problem in problems:
            print(f"cleanup problem: {problem}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bandwidth", default="16Mi", help="the BlockPull's spec.bandwidth, bytes/s (default: %(default)s)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="at the end, leave the API stand-in and the agent up until Ctrl-C"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = dict.fromkeys([QEMU_IMG, QEMU_IO, QEMU_SYSTEM, "qemu-img", "kubectl"])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        print(f"demo: missing {', '.join(missing)}; run `bash scripts/setup.sh` first", file=sys.stderr)
        return 1
    handle_signals()
    demo = Demo(bandwidth=args.bandwidth, keep=args.keep)
    status = 1
    try:
        demo.main()
        status = 0
    except Exception as exc:
        stopping()
        signum = interrupted_by()
        if signum is not None:
            # Also when the signal made a step fail first (Ctrl-C ends kubectl and qemu-img too).
            print(f"\ninterrupted by {signal.Signals(signum).name}: stopping everything", flush=True)
            status = 128 + signum
        elif isinstance(exc, DemoError):
            print(f"\ndemo failed: {exc}", file=sys.stderr, flush=True)
            demo.show_logs()
        else:
            traceback.print_exc()
            demo.show_logs()
    finally:
        stopping()
        demo.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
