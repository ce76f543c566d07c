"""`pull --no-wait`, then `jobs` and `wait` from later processes: outcomes survive the CLI."""

from __future__ import annotations

import pytest

from qemulab import EIO, InjectError
from qemulab.imageinfo import host_offset

from .conftest import LabFactory
from .support import SLOW, Lab, assert_one_error_line, run_cli

pytestmark = pytest.mark.qemu


def concluded(job: dict[str, object]) -> bool:
    return job["status"] == "concluded"


def test_wait_from_a_new_process_follows_the_job_to_its_end(slow_lab: Lab) -> None:
    started = run_cli("pull", slow_lab.socket, slow_lab.top, "--bandwidth", SLOW, "--no-wait")
    assert started.returncode == 0, str(started)
    job_id = started.stdout.strip()
    assert slow_lab.jobs()[0]["status"] == "running", "--no-wait leaves the job running"

    ran = run_cli("wait", slow_lab.socket, job_id)

    assert ran.returncode == 0, str(ran)
    assert ran.stdout.startswith(f"completed: job {job_id} (128.0 MiB) in ")
    assert f"{job_id}: " in ran.stderr, "progress lines while it follows"
    assert slow_lab.jobs() == [], "wait dismisses the job it reported"
    slow_lab.stop()
    slow_lab.assert_intact_and_unchanged()
    assert slow_lab.backing_names() == []


def test_a_job_that_completed_while_nobody_was_connected(lab: Lab) -> None:
    job_id = run_cli("pull", lab.socket, lab.top, "--no-wait", "--job-id", "quick").stdout.strip()
    lab.wait_job(job_id, concluded)  # it ended with no client on the CLI's monitor

    listed = run_cli("jobs", lab.socket, "--output", "json")
    [job] = listed.json()["jobs"]
    assert (job["status"], job["result"], job["error"]) == ("concluded", "completed", None)
    assert run_cli("jobs", lab.socket).returncode == 0
    assert lab.jobs() != [], "`jobs` only reads: the outcome stays for whoever reports it"

    ran = run_cli("wait", lab.socket, job_id, "-o", "json")

    assert ran.returncode == 0, str(ran)
    doc = ran.json()
    assert doc["result"] == "completed"
    assert doc["already_concluded"] is True
    assert lab.jobs() == []
    lab.stop()
    lab.assert_intact_and_unchanged()
    assert lab.backing_names() == []


def test_a_job_that_failed_while_nobody_was_connected(make_lab: LabFactory) -> None:
    probe = make_lab()
    sector = host_offset(probe.chain.base, 0) // 512
    probe.stop()
    broken = make_lab(inject={0: [InjectError(errno=EIO, sector=sector)]})
    job_id = run_cli("pull", broken.socket, broken.top, "--no-wait").stdout.strip()
    broken.wait_job(job_id, concluded)

    table = run_cli("jobs", broken.socket)
    assert "failed" in table.stdout and "Input/output error" in table.stdout, str(table)

    ran = run_cli("wait", broken.socket, job_id)

    assert ran.returncode == 1, str(ran)
    assert_one_error_line(ran, f"failed: job {job_id}", "Input/output error", "before we looked")
    assert broken.jobs() == []
    broken.stop()
    assert len(broken.backing_names()) == 3, "a failed pull keeps the chain"


def test_wait_with_a_timeout_cancels_the_job(slow_lab: Lab) -> None:
    job_id = run_cli("pull", slow_lab.socket, slow_lab.top, "--bandwidth", SLOW, "--no-wait").stdout.strip()

    ran = run_cli("wait", slow_lab.socket, job_id, "--timeout", "0.5", "-q")

    assert ran.returncode == 124, str(ran)
    assert_one_error_line(ran, "timed out", f"cancelled job {job_id}")
    assert slow_lab.jobs() == []
    slow_lab.stop()
    slow_lab.assert_intact_and_unchanged()
