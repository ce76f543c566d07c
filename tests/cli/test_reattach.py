"""`pull --no-wait`, then `jobs` and `wait` from later processes: outcomes survive the CLI."""

from __future__ import annotations

import pytest

from qemulab import EIO, InjectError, check, compare
from qemulab.imageinfo import backing_chain, host_offset

from .conftest import LabFactory
from .support import SLOW, Lab, assert_one_error_line, run_cli

pytestmark = pytest.mark.qemu


def concluded(job: dict[str, object]) -> bool:
    return job["status"] == "concluded"


def pending(job: dict[str, object]) -> bool:
    return job["status"] == "pending"


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
    # Copied with no client on the CLI's monitor: the job waits at `pending`, and the disk still
    # names its backing file until someone flushes and finalizes (nothing to lose meanwhile).
    lab.wait_job(job_id, pending)
    assert len(backing_chain(lab.chain.top, force_share=True)) == 4, "the chain changes only at finalize"

    listed = run_cli("jobs", lab.socket, "--output", "json")
    [job] = listed.json()["jobs"]
    assert (job["status"], job["result"], job["error"]) == ("pending", None, None)
    table = run_cli("jobs", lab.socket)
    assert table.returncode == 0
    assert f"blockpull wait {lab.socket} {job_id}" in table.stdout, table.stdout
    assert lab.jobs() != [], "`jobs` only reads: the job stays for whoever concludes it"

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


def test_an_uncollected_no_wait_job_loses_nothing_when_qemu_dies(lab: Lab) -> None:
    """`pull --no-wait` and nobody runs `wait`: the job waits at `pending`; QEMU SIGKILLed then
    leaves a disk that shows the guest's data through its intact chain (checked as the image
    headers chain it, before anything re-attaches it), and a new pull completes it."""
    job_id = run_cli("pull", lab.socket, lab.top, "--no-wait").stdout.strip()
    lab.wait_job(job_id, pending)
    lab.vm.kill()
    assert backing_chain(lab.chain.top) == [str(p) for p in reversed(lab.chain.images)]
    assert compare(lab.chain.top, lab.chain.reference)
    assert check(lab.chain.top).clean

    lab.vm.start_sync()
    assert lab.jobs() == [], "QEMU forgot the job with its process"
    again = run_cli("pull", lab.socket, lab.top)
    assert again.returncode == 0, str(again)
    lab.vm.kill()  # killed right after the CLI said completed
    assert backing_chain(lab.chain.top) == [str(lab.chain.top)]
    assert compare(lab.chain.top, lab.chain.reference)
    assert check(lab.chain.top).clean
