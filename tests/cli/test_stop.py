"""Stopping a pull: `--timeout`, Ctrl-C / SIGTERM, and QEMU dying under it."""

from __future__ import annotations

import signal
import time

import pytest

from .support import SLOW, Lab, Running, assert_one_error_line, run_cli

pytestmark = pytest.mark.qemu

PROGRESS = r"^\S+: +\d+\.\d\d% \("


def assert_cancelled_cleanly(lab: Lab) -> None:
    """The job is gone, QEMU lives, and the disk still reads as before through its chain."""
    assert lab.jobs() == [], "the cancelled job is dismissed"
    assert lab.vm.alive, "QEMU survived the cancel"
    lab.stop()
    lab.assert_intact_and_unchanged()
    assert len(lab.backing_names()) == len(lab.chain.images) - 1, "backing chain kept"


def test_timeout_cancels_the_job_and_exits_124(slow_lab: Lab) -> None:
    ran = run_cli("pull", slow_lab.socket, slow_lab.top, "--bandwidth", SLOW, "--timeout", "1", "-o", "json")

    assert ran.returncode == 124, str(ran)
    assert_one_error_line(ran, "timed out", "cancelled job", "keeps its backing chain")
    doc = ran.json()
    assert doc["result"] == "cancelled"
    assert doc["stopped_by"] == "timeout"
    assert doc["exit_status"] == 124
    assert 0 < doc["offset"] < doc["length"], "stopped part-way"
    assert doc["released_images"] == []
    assert 1.0 <= doc["elapsed_seconds"] < 3.0
    assert_cancelled_cleanly(slow_lab)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_cancels_the_job(slow_lab: Lab, sig: signal.Signals, status: int) -> None:
    pull = Running("pull", slow_lab.socket, slow_lab.top, "--bandwidth", SLOW)
    pull.wait_for_stderr(PROGRESS)
    sent = pull.send_signal(sig)
    ran = pull.finish()

    assert ran.returncode == status, str(ran)
    assert pull.started + ran.elapsed - sent < 2.5, "cancel confirmed and reported promptly"
    assert f"blockpull: {sig.name}: cancelling job" in ran.stderr
    assert_one_error_line(ran, f"interrupted by {sig.name}", "cancelled job")
    assert ran.stdout == ""
    assert_cancelled_cleanly(slow_lab)


def test_qemu_killed_mid_pull_is_reported_at_once(slow_lab: Lab) -> None:
    pull = Running("pull", slow_lab.socket, slow_lab.top, "--bandwidth", SLOW, "-o", "json")
    pull.wait_for_stderr(PROGRESS)
    killed = time.monotonic()
    slow_lab.vm.kill(signal.SIGKILL)
    ran = pull.finish()

    assert ran.returncode == 5, str(ran)
    assert_one_error_line(ran, "QEMU exited during the pull")
    assert ran.json()["error"]["reason"] == "VMExited"
    assert pull.started + ran.elapsed - killed < 2.0, "noticed at once, not after a timeout"
    # SIGKILL loses QEMU's unflushed progress, never the data: the chain still reads the same.
    slow_lab.stop()
    slow_lab.assert_intact_and_unchanged()
