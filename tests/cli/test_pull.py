"""`blockpull pull`, `chain`, `jobs` and `abort` through pipes: what scripts and logs see."""

from __future__ import annotations

import re

import pytest

from qemulab import backing_chain, check, compare

from .conftest import LabFactory
from .support import SLOW, Lab, run_cli

pytestmark = pytest.mark.qemu

PLAIN_LINE = re.compile(r"^(?P<job>\S+): +(?P<pct>\d+\.\d\d)% \((?P<off>\d+)/(?P<len>\d+) bytes")


def test_full_pull_prints_plain_progress_and_flattens_the_disk(slow_lab: Lab) -> None:
    ran = run_cli("pull", slow_lab.socket, slow_lab.top, "--bandwidth", SLOW, "--job-id", "full1")

    assert ran.returncode == 0, str(ran)
    assert "\r" not in ran.stderr and "\x1b" not in ran.stderr, "no terminal codes into a pipe"
    assert "started job full1 streaming into node" in ran.stderr
    lines = [m for m in map(PLAIN_LINE.match, ran.stderr.splitlines()) if m]
    assert len(lines) >= 2, str(ran)
    percents = [float(m["pct"]) for m in lines]
    assert percents == sorted(percents), "progress only moves forward"
    assert all(m["job"] == "full1" for m in lines)
    assert ran.elapsed > 1.0, "throttled: several lines, at most one a second"
    assert len(lines) <= ran.elapsed + 2
    [result] = ran.stdout.splitlines()
    assert result.startswith("completed: job full1 pulled disk")
    assert "it no longer has a backing file" in result
    assert all(str(image) in result for image in slow_lab.chain.images[:-1]), "released images"

    assert slow_lab.jobs() == [], "the job is dismissed once its outcome is printed"
    slow_lab.stop()
    slow_lab.assert_intact_and_unchanged()
    assert slow_lab.backing_names() == []


def test_pull_to_a_base_by_path_keeps_the_relative_backing_name(lab: Lab) -> None:
    base = lab.chain.images[1]  # keep mid1 and everything below it
    ran = run_cli("-o", "json", "pull", lab.socket, str(lab.chain.top), "--base", str(base))

    assert ran.returncode == 0, str(ran)
    result = ran.json()
    assert result["result"] == "completed"
    assert result["exit_status"] == 0
    assert result["error"] is None
    assert result["device"] == lab.top
    assert result["base_node"] == lab.node(1)
    assert result["released_images"] == [str(p) for p in lab.chain.images[2:-1]]
    assert result["offset"] == result["length"] == lab.chain.size
    assert result["progress"] == "100.00%"
    assert lab.jobs() == []

    lab.stop()
    lab.assert_intact_and_unchanged()
    assert lab.backing_names()[0] == base.name, "a relative backing name stays relative"


def test_chain_lists_the_backing_chain_active_image_first(lab: Lab) -> None:
    text = run_cli("chain", lab.socket, lab.top)
    as_json = run_cli("chain", lab.socket, str(lab.chain.top), "--output", "json")

    assert text.returncode == 0 and as_json.returncode == 0, str(text) + str(as_json)
    doc = as_json.json()
    assert doc["device"] == lab.top
    assert [i["node_name"] for i in doc["images"]] == list(reversed(lab.disk.format_nodes))
    assert [i["filename"] for i in doc["images"]] == [str(p) for p in reversed(lab.chain.images)]
    assert [i["backing_name"] for i in doc["images"]] == [
        *(p.name for p in reversed(lab.chain.images[:-1])),
        None,
    ]
    assert all(i["format"] == "qcow2" and i["virtual_size"] == lab.chain.size for i in doc["images"])
    header, *rows = text.stdout.splitlines()
    assert header.split()[:3] == ["#", "NODE", "FORMAT"]
    assert [row.split()[1] for row in rows] == list(reversed(lab.disk.format_nodes))


def test_jobs_shows_a_running_job_and_abort_cancels_it(slow_lab: Lab) -> None:
    started = run_cli("pull", slow_lab.socket, slow_lab.top, "--bandwidth", "8Mi", "--no-wait")
    assert started.returncode == 0, str(started)
    job_id = started.stdout.strip()
    assert re.fullmatch(r"blockpull-[0-9a-f]{8}", job_id)

    listed = run_cli("jobs", slow_lab.socket, "-o", "json")
    assert listed.returncode == 0, str(listed)
    [job] = listed.json()["jobs"]
    assert job["id"] == job_id
    assert job["type"] == "stream"
    assert job["status"] == "running"
    assert job["result"] is None
    assert job["speed"] == 8 * 2**20
    assert job["paused"] is False and job["io_status"] == "ok" and job["error"] is None
    assert 0 <= job["offset"] < job["length"] == slow_lab.chain.size
    table = run_cli("jobs", slow_lab.socket)
    assert job_id in table.stdout and "running" in table.stdout and "8.0 MiB/s" in table.stdout

    aborted = run_cli("abort", slow_lab.socket, job_id)
    assert aborted.returncode == 0, str(aborted)
    assert aborted.stdout.startswith(f"cancelled: job {job_id} stopped at ")
    assert "keeps its backing chain" in aborted.stdout
    assert slow_lab.jobs() == [], "dismissed after the cancel was confirmed"
    assert run_cli("jobs", slow_lab.socket).stdout.strip() == "no block jobs"

    assert slow_lab.vm.alive
    slow_lab.stop()
    slow_lab.assert_intact_and_unchanged()
    assert len(slow_lab.backing_names()) == 3, "the chain is still there"


def test_abort_cancels_a_paused_job(slow_lab: Lab) -> None:
    started = run_cli("pull", slow_lab.socket, slow_lab.top, "--bandwidth", "8Mi", "--no-wait")
    job_id = started.stdout.strip()
    slow_lab.execute("job-pause", {"id": job_id})
    slow_lab.wait_job(job_id, lambda job: job["status"] == "paused")

    aborted = run_cli("abort", slow_lab.socket, job_id, "--output", "json")

    assert aborted.returncode == 0, str(aborted)
    doc = aborted.json()
    assert doc["result"] == "cancelled"
    assert doc["stopped_by"] == "abort"
    assert slow_lab.jobs() == []


def test_pull_of_a_disk_without_backing_file_completes_at_once(make_lab: LabFactory) -> None:
    single = make_lab(layers=1)

    ran = run_cli("pull", single.socket, single.top, "-q")

    assert ran.returncode == 0, str(ran)
    assert ran.stderr == ""
    assert ran.stdout.startswith("completed: ")
    assert single.jobs() == []
    single.stop()
    single.assert_intact_and_unchanged()


def test_a_completed_pull_survives_qemu_killed_right_after(lab: Lab) -> None:
    # QEMU 7.2 may keep the copied clusters' metadata in its cache after the job completes;
    # `blockpull pull` flushes before reporting, so a SIGKILL right after loses nothing.
    ran = run_cli("pull", lab.socket, lab.top)
    assert ran.returncode == 0, str(ran)
    lab.vm.kill()
    assert backing_chain(lab.chain.top) == [str(lab.chain.top)]
    assert compare(lab.chain.top, lab.chain.reference)
    assert check(lab.chain.top).corruptions == 0
