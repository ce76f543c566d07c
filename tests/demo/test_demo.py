"""The README's demo command end to end, and its clean-up when interrupted or failing.

The demo starts QEMU, the API stand-in, the agent and kubectl processes; every test checks
that it stopped them itself before it exited. It runs under a small wrapper that is a child
subreaper (`PR_SET_CHILD_SUBREAPER`): whatever the demo leaves behind becomes the wrapper's
child, and the wrapper reports it, even a process the kernel killed for the demo afterwards
(the demo starts its processes with `setpriv --pdeathsig KILL` as a safety net, which would
otherwise hide a missing stop). On top: no live process mentions the demo's work directory,
none of the pids it announced runs, and the work directory is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[2]
DEMO_SH = REPO / "scripts" / "demo.sh"
DEMO_PY = REPO / "scripts" / "demo.py"
OBJECT = "flatten-web-1-root"
#: How long the demo may take to stop everything once interrupted (the agent alone may take
#: about 5 s to stop while it follows a job, see the report on runner.py).
STOP_BUDGET = 20.0


@pytest.fixture(autouse=True)
def _tools(qemu_binaries: None) -> None:
    # scripts/setup.sh installs kubectl: missing, the demo cannot run, which is a failure.
    assert shutil.which("kubectl") is not None, "kubectl missing: run scripts/setup.sh"


#: Runs argv[1:] as a child subreaper; forwards SIGINT/SIGTERM to it; after it exited, lists and
#: reaps every process reparented to the wrapper (an orphan of the demo), last line of stdout.
SUBREAPER = r"""
import ctypes, os, signal, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
child = subprocess.Popen(sys.argv[1:])
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: child.send_signal(signum))
code = child.wait()
orphans = []
for entry in os.listdir("/proc"):
    try:
        stat = open(f"/proc/{entry}/stat").read()
    except (OSError, ValueError):
        continue
    comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    if entry.isdigit() and int(fields[1]) == os.getpid():
        orphans.append(f"{entry}:{comm}")
        try:
            os.kill(int(entry), signal.SIGKILL)
        except ProcessLookupError:
            pass
for orphan in orphans:
    try:
        os.waitpid(int(orphan.split(":")[0]), 0)
    except ChildProcessError:
        pass
print("orphans:", " ".join(orphans) or "none", flush=True)
sys.exit(code)
"""


def demo_argv(*argv: str) -> list[str]:
    return [sys.executable, "-c", SUBREAPER, *argv]


def workdir_of(output: str) -> Path:
    found = re.search(r"^work dir: (/\S+)", output, re.MULTILINE)
    assert found, f"the demo did not say its work directory:\n{output}"
    return Path(found[1])


def announced_pids(output: str) -> set[int]:
    """The pids the demo reported for what it started (QEMU, the API, the agent, kubectl -w)."""
    return {int(pid) for pid in re.findall(r"\(pid (\d+)", output)}


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(text: str) -> list[str]:
    """Live processes (not zombies) with `text` in their command line or environment."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if (needle in cmdline or needle in environ) and _running(int(entry.name)):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command[:200]}")
    return found


def assert_nothing_left(output: str) -> None:
    assert output.rstrip().splitlines()[-1] == "orphans: none", output[-3000:]
    workdir = workdir_of(output)
    pids = announced_pids(output)
    assert len(pids) >= 3, f"expected QEMU, API and agent pids in the output:\n{output}"
    assert not [pid for pid in pids if _running(pid)], f"still running: {pids}"
    assert processes_mentioning(str(workdir)) == []
    assert not workdir.exists(), f"{workdir} was not removed"


def demo_env() -> dict[str, str]:
    # The demo must not depend on the caller's cluster settings.
    return {k: v for k, v in os.environ.items() if k != "KUBECONFIG" and not k.startswith("BLOCKPULL_")}


def test_demo_flattens_the_live_disk_and_proves_it() -> None:
    started = time.monotonic()
    done = subprocess.run(
        demo_argv("bash", str(DEMO_SH)),
        cwd=REPO,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    lines = out.splitlines()
    assert took < 60, f"the demo took {took:.0f} s"

    # Every step ran, in order.
    headers = [line for line in lines if re.match(r"^\d/7 ", line)]
    assert [h.split()[0] for h in headers] == [f"{n}/7" for n in range(1, 8)], headers

    # Before: a three-image chain; the active image has a backing file.
    before = out.split("1/7 ", 1)[1].split("2/7 ", 1)[0]
    assert re.findall(r"^image: (\S+)", before, re.MULTILINE) == [
        "web-1-root.qcow2",
        "mid.qcow2",
        "template.qcow2",
    ]
    assert re.findall(r"^backing file: (\S+)", before, re.MULTILINE) == ["mid.qcow2", "template.qcow2"]

    # The watch showed the pull running with progress, and ended on Completed.
    rows = [line.split() for line in lines if line.startswith(f"{OBJECT} ")]
    phases = [row[4] for row in rows if len(row) > 5]
    assert "Running" in phases, rows
    assert phases[-1] == "Completed", rows
    assert rows[-1][5] == "100.00%", rows
    assert any(row[4] == "Running" and re.fullmatch(r"\d+\.\d\d%", row[5]) for row in rows), rows

    # kubectl wait, the status and the Events.
    assert f"blockpull.blockpull.dev/{OBJECT} condition met" in lines
    status = out.split("\nstatus:\n", 1)[1].split("\nEvents:", 1)[0]
    assert "\n  phase: Completed\n" in status
    assert "\n  progress: 100.00%\n" in status
    assert re.search(r"releasedImages:\n  - \S+/mid\.qcow2\n  - \S+/template\.qcow2\n", status), status
    events = out.split("\nEvents:\n", 1)[1].split("\n7/7 ", 1)[0]
    reasons = re.findall(r"^  Normal\s+(\w+)\s", events, re.MULTILINE)
    assert reasons == ["Started", "Completed"], events

    # After: the active image stands alone, shows the guest what the reference holds, is clean.
    after = out.split("7/7 ", 1)[1]
    assert re.findall(r"^image: (\S+)", after, re.MULTILINE) == ["web-1-root.qcow2"]
    assert "backing file:" not in after
    assert "$ qemu-img compare web-1-root.qcow2 reference.qcow2\nImages are identical.\n" in after
    assert "$ qemu-img check web-1-root.qcow2\nNo errors were found on the image.\n" in after

    assert_nothing_left(out)


class DemoRun:
    """`scripts/demo.py` as a background process, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            demo_argv(sys.executable, str(DEMO_PY), *args),
            cwd=REPO,
            env=demo_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, for a Ctrl-C without hitting pytest
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()

    @property
    def output(self) -> str:
        with self._new:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))
                self._new.wait(min(remaining, 0.5))

    def finish(self, timeout: float) -> int:
        returncode = self.proc.wait(timeout)
        self._reader.join(10)
        return returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "Ctrl-C"],
)
def test_interrupted_mid_pull_stops_everything(sig: signal.Signals, to_group: bool) -> None:
    """SIGINT or SIGTERM to the demo alone, or Ctrl-C in a terminal: SIGINT to its whole
    process group (the demo, any short command it runs at that moment, and here the wrapper,
    which forwards it once more)."""
    # 1 MiB/s: the pull would take over a minute, so the signal surely comes mid-pull.
    demo = DemoRun("--bandwidth", "1Mi")
    try:
        demo.wait_for_line(rf"^{OBJECT} .* Running +\d+\.\d\d% ")
        interrupted = time.monotonic()
        if to_group:
            os.killpg(demo.proc.pid, sig)
        else:
            demo.proc.send_signal(sig)
        returncode = demo.finish(timeout=STOP_BUDGET + 10)
        took = time.monotonic() - interrupted
    finally:
        demo.kill()
    out = demo.output
    assert returncode == 128 + sig, out
    assert took < STOP_BUDGET, f"stopping took {took:.1f} s:\n{out}"
    assert f"interrupted by {sig.name}: stopping everything" in out
    assert "condition met" not in out
    assert "demo failed" not in out
    cleaned = r"^cleaned up: stopped kubectl get -w \(pid \d+.*, the agent .*, QEMU .*, the API"
    assert re.search(cleaned, out, re.MULTILINE), out
    assert_nothing_left(out)


def test_failing_step_stops_everything() -> None:
    # The API refuses the object (spec.bandwidth must be a quantity): step 5 fails.
    demo = DemoRun("--bandwidth", "fast")
    try:
        returncode = demo.finish(timeout=90)
    finally:
        demo.kill()
    out = demo.output
    assert returncode == 1, out
    assert "5/7 creating the BlockPull" in out
    assert "6/7" not in out
    assert re.search(r"spec\.bandwidth", out), out
    assert "demo failed: `kubectl apply -f - <<EOF" in out
    assert "----- agent log (" in out  # the logs' last lines, before they are removed
    assert_nothing_left(out)
