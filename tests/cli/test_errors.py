"""Failures: one `blockpull: error: ...` line, no traceback, a documented exit status."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemulab import EIO, InjectError
from qemulab.imageinfo import host_offset

from .conftest import LabFactory
from .support import Lab, assert_one_error_line, run_cli

pytestmark = pytest.mark.qemu


@pytest.fixture
def silent_socket(short_tmp: Path) -> Iterator[str]:
    """A unix socket that accepts connections and never says a word (no QMP greeting)."""
    path = str(short_tmp / "silent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def test_unknown_disk(lab: Lab) -> None:
    ran = run_cli("pull", lab.socket, "no-such-disk")

    assert ran.returncode == 4, str(ran)
    assert_one_error_line(ran, "QEMU has no disk 'no-such-disk'")
    assert ran.stdout == ""
    assert lab.jobs() == [], "nothing started"


def test_base_not_in_chain_in_json(lab: Lab, tmp_path: Path) -> None:
    ran = run_cli("pull", lab.socket, lab.top, "--base", str(tmp_path / "other.qcow2"), "-o", "json")

    assert ran.returncode == 4, str(ran)
    assert_one_error_line(ran, "is not in the backing chain")
    error = ran.json()["error"]
    assert error["reason"] == "BaseNotInChain"
    assert error["exit_status"] == 4
    assert lab.jobs() == []


def test_the_disk_itself_as_base(lab: Lab) -> None:
    ran = run_cli("pull", lab.socket, lab.top, "--base", lab.top)

    assert ran.returncode == 4, str(ran)
    assert_one_error_line(ran, "is the disk", "not an image below it")


def test_missing_socket(tmp_path: Path) -> None:
    ran = run_cli("jobs", str(tmp_path / "nothing.sock"), "-o", "json")

    assert ran.returncode == 3, str(ran)
    assert_one_error_line(ran, "no QMP socket at", "is the VM running?")
    assert ran.json()["error"]["reason"] == "WaitingForVM"


def test_a_socket_that_never_greets_fails_within_the_connect_timeout(silent_socket: str) -> None:
    baseline = run_cli("--help")  # what starting the interpreter costs here, to subtract
    ran = run_cli("--connect-timeout", "0.5", "jobs", silent_socket)

    assert ran.returncode == 3, str(ran)
    assert_one_error_line(ran, "did not greet", "within 0.5s")
    assert ran.elapsed - baseline.elapsed < 0.5 + 1.0, str(ran)


def test_a_qmp_monitor_held_by_another_client(lab: Lab) -> None:
    # A -qmp monitor serves one client: the kernel accepts a second, QEMU never greets it.
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.connect(lab.socket)
    try:
        holder.recv(4096)  # QEMU's greeting: this connection is now the monitor's client
        ran = run_cli("chain", lab.socket, lab.top, "--connect-timeout", "0.5")
    finally:
        holder.close()

    assert ran.returncode == 3, str(ran)
    assert_one_error_line(ran, "another client holding this monitor")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bandwidth", "fast"], "is not a quantity"),
        (["--bandwidth", "-1"], "is not a quantity"),
        (["--timeout", "0"], "must be a positive number of seconds"),
        (["--on-error", "explode"], "invalid choice"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], fragment: str) -> None:
    ran = run_cli("pull", "/nonexistent.sock", "disk", *args)

    assert ran.returncode == 2, str(ran)
    assert fragment in ran.stderr
    assert "Traceback" not in ran.stderr


def test_invalid_job_id(lab: Lab) -> None:
    ran = run_cli("pull", lab.socket, lab.top, "--job-id", "9lives")

    assert ran.returncode == 2, str(ran)
    assert_one_error_line(ran, "job id '9lives' must start with a letter")


def test_a_busy_disk_is_refused_and_the_running_job_untouched(make_lab: LabFactory) -> None:
    # -drive: QEMU reports the chain in query-block, so it can be read while a job runs and it
    # is QEMU itself that refuses the second job.
    busy = make_lab(throttleable=True, attach="drive")
    first = run_cli("pull", busy.socket, busy.top, "--bandwidth=4Mi", "--no-wait", "--job-id=j1")
    assert first.returncode == 0, str(first)

    same_id = run_cli("pull", busy.socket, busy.top, "--job-id", "j1")
    other_id = run_cli("pull", busy.socket, busy.top, "--job-id", "j2", "-o", "json")

    assert same_id.returncode == 3, str(same_id)
    assert_one_error_line(same_id, "held by stream job j1 (running")  # the node is checked first
    assert other_id.returncode == 3, str(other_id)
    assert_one_error_line(other_id, "held by stream job j1 (running", "try again once it has ended")
    assert other_id.json()["error"]["reason"] == "DiskBusy"
    [job] = busy.jobs()
    assert job["id"] == "j1" and job["status"] == "running"


def test_no_chain_listing_while_a_job_runs_on_a_blockdev_only_vm(slow_lab: Lab) -> None:
    # Without a guest device QEMU's node list is the only source, and listing nodes while a
    # stream job may conclude crashes QEMU 7.2: the engine refuses, the VM lives.
    run_cli("pull", slow_lab.socket, slow_lab.top, "--bandwidth=4Mi", "--no-wait", "--job-id=j1")

    ran = run_cli("chain", slow_lab.socket, slow_lab.top)

    assert ran.returncode == 3, str(ran)
    assert_one_error_line(ran, "is busy with block job j1", "try again")
    assert slow_lab.vm.alive


def test_unknown_job(lab: Lab) -> None:
    for command in ("wait", "abort"):
        ran = run_cli(command, lab.socket, "nope")
        assert ran.returncode == 4, str(ran)
        assert_one_error_line(ran, "QEMU has no block job 'nope'")


def test_a_failed_job_reports_qemus_error_and_keeps_the_chain(make_lab: LabFactory, tmp_path: Path) -> None:
    # Build once to learn where the base holds guest offset 0, then fail reads there.
    probe = make_lab()
    sector = host_offset(probe.chain.base, 0) // 512
    probe.stop()
    broken = make_lab(inject={0: [InjectError(errno=EIO, sector=sector)]})

    ran = run_cli("pull", broken.socket, broken.top, "-o", "json")

    assert ran.returncode == 1, str(ran)
    assert_one_error_line(ran, "failed: job", "Input/output error", "keeps its backing chain")
    doc = ran.json()
    assert doc["result"] == "failed"
    assert doc["error"] == "Input/output error"
    assert doc["exit_status"] == 1
    assert doc["released_images"] == []
    assert broken.jobs() == [], "the failed job is dismissed once reported"
    assert broken.vm.alive
    broken.stop()
    assert len(broken.backing_names()) == 3


def test_a_finished_job_nobody_collected_is_named_with_the_command_that_collects_it(lab: Lab) -> None:
    left = run_cli("pull", lab.socket, lab.top, "--no-wait", "--job-id", "left").stdout.strip()
    lab.wait_job(left, lambda job: job["status"] == "pending")

    again = run_cli("pull", lab.socket, lab.top, "--job-id", "again")

    assert again.returncode == 3, str(again)
    assert_one_error_line(
        again, "held by stream job left (copy done, waiting to be finalized)", "it has ended",
        f"blockpull wait {lab.socket} left",
    )  # fmt: skip
    collected = run_cli("wait", lab.socket, "left")
    assert collected.returncode == 0, str(collected)
    assert lab.jobs() == []


def test_a_socket_that_closes_at_once_says_so(short_tmp: Path) -> None:
    path = str(short_tmp / "closes.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                connection, _ = server.accept()
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        ran = run_cli("--connect-timeout", "2", "jobs", path)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert ran.returncode == 3, str(ran)
    assert_one_error_line(ran, "closed the connection before greeting")
    assert "EOFError" not in ran.stderr
