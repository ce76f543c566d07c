"""The CLI's pure parts, no QEMU: parsing, exit statuses, and what it draws and prints."""

from __future__ import annotations

import io

import pytest

from blockpull import cli
from blockpull.cli_render import (
    PlainProgress,
    ProgressBar,
    RateMeter,
    Report,
    format_duration,
    outcome_line,
)
from blockpull.driver import Outcome, Progress, Result
from blockpull.errors import (
    BaseNotInChain,
    BlockPullError,
    DiskBusy,
    DiskNotFound,
    InspectionUnsafe,
    InvalidSpec,
    JobFailed,
    JobNotFound,
    QMPTimeout,
    VMExited,
    VMNotFound,
)

MiB = 2**20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(offset: int, length: int = 100 * MiB, **changes: object) -> Progress:
    fields: dict[str, object] = {
        "job_id": "j1",
        "status": "running",
        "offset": offset,
        "length": length,
        "speed": 0,
        "paused": False,
        "io_status": "ok",
        "error": None,
        "job_type": "stream",
    }
    fields.update(changes)
    return Progress(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "--:--"), (float("inf"), "--:--"), (0, "0:00"), (4.4, "0:04"), (750, "12:30"), (3723, "1:02:03")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_rate_and_eta_come_from_a_trailing_window() -> None:
    meter = RateMeter(window=5.0)
    assert meter.rate() is None and meter.eta(10) is None
    for second in range(11):
        meter.add(float(second), second * 10 * MiB)
    assert meter.rate() == pytest.approx(10 * MiB)
    assert meter.eta(50 * MiB) == pytest.approx(5.0)
    assert meter.eta(0) == 0.0
    meter.add(11.0, 0)  # a new job under the same display: start over, never a negative rate
    assert meter.rate() is None


def test_plain_lines_are_rate_limited_and_the_last_change_is_not_lost() -> None:
    out, clock = io.StringIO(), Clock()
    plain = PlainProgress(out, "j1", interval=1.0, clock=clock)
    plain.update(job(0))
    clock.now += 0.5
    plain.update(job(10 * MiB))  # too soon: held back
    clock.now += 0.2
    plain.update(job(20 * MiB))  # too soon: replaces the held-back one
    assert len(out.getvalue().splitlines()) == 1
    clock.now += 0.5
    plain.update(job(30 * MiB))
    clock.now += 1.0
    plain.update(job(30 * MiB))  # no change: no line
    clock.now += 0.1
    plain.update(job(40 * MiB))
    plain.finish()
    lines = out.getvalue().splitlines()
    assert [line.split("%")[0].split()[-1] for line in lines] == ["0.00", "30.00", "40.00"]
    assert lines[1].startswith("j1:  30.00% (31457280/104857600 bytes, 30.0 MiB of 100.0 MiB) rate ")


def test_a_job_paused_by_an_io_error_says_so() -> None:
    out = io.StringIO()
    PlainProgress(out, "j1").update(job(5 * MiB, paused=True, status="paused", io_status="failed"))
    assert out.getvalue().rstrip().endswith("[paused by QEMU: I/O failed]")


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_the_bar_fits_the_terminal_and_ends_with_the_outcome(
    columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, clock = io.StringIO(), Clock()
    monkeypatch.setattr("blockpull.cli_render._terminal_width", lambda stream: columns)
    bar = ProgressBar(out, "blockpull-0123abcd", clock=clock)
    for step in range(5):
        bar.update(job(step * 20 * MiB))
        clock.now += 0.5
    bar.finish(Outcome("j1", Result.COMPLETED, 100 * MiB, 100 * MiB))
    frames = out.getvalue().split("\r")[1:]
    assert all(len(frame.removesuffix("\x1b[K\n").removesuffix("\x1b[K")) < columns for frame in frames)
    assert "100.00%" in frames[-1] and "completed" in frames[-1] and frames[-1].endswith("\n")


def outcome(result: Result, offset: int = 50 * MiB, error: str | None = None) -> Outcome:
    return Outcome("j1", result, offset, 100 * MiB, error)


@pytest.mark.parametrize(
    ("report", "status", "start"),
    [
        (Report(outcome(Result.COMPLETED, 100 * MiB), disk="vda", device="n"), 0, "completed: job j1 pulled"),
        (Report(outcome(Result.COMPLETED, 100 * MiB), stopped_by="SIGINT"), 0, "completed (the cancel lost"),
        (Report(outcome(Result.COMPLETED, 100 * MiB), stopped_by="timeout"), 0, "completed (the cancel lost"),
        (Report(outcome(Result.CANCELLED), stopped_by="timeout", elapsed=2.0), 124, "timed out in 2.0s"),
        (Report(outcome(Result.CANCELLED), stopped_by="SIGINT"), 130, "interrupted by SIGINT"),
        (Report(outcome(Result.CANCELLED), stopped_by="SIGTERM"), 143, "interrupted by SIGTERM"),
        (Report(outcome(Result.CANCELLED), stopped_by="abort"), 0, "cancelled: job j1 stopped at 50.00%"),
        (Report(outcome(Result.CANCELLED)), 1, "cancelled: job j1"),
        (Report(outcome(Result.FAILED, error="Input/output error")), 1, "failed: job j1 at 50.00%"),
    ],
)
def test_outcomes_map_to_a_line_and_an_exit_status(report: Report, status: int, start: str) -> None:
    assert cli.outcome_status(report) == status
    assert outcome_line(report).startswith(start)


def test_a_failure_carries_qemus_text_and_a_pull_names_what_it_released() -> None:
    failed = Report(outcome(Result.FAILED, error="No space left on device"))
    assert "No space left on device" in outcome_line(failed)
    done = Report(
        outcome(Result.COMPLETED, 100 * MiB),
        disk="vda",
        device="n",
        base="/b.qcow2",
        released_images=("/m.qcow2",),
    )
    assert "now backed by /b.qcow2; no longer needed: /m.qcow2" in outcome_line(done)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidSpec("x"), 2),
        (VMNotFound("x"), 3),
        (QMPTimeout("x"), 3),
        (DiskBusy("x"), 3),
        (InspectionUnsafe("x"), 3),
        (DiskNotFound("x"), 4),
        (BaseNotInChain("x"), 4),
        (JobNotFound("x"), 4),
        (JobFailed("x"), 1),
        (VMExited("x"), 5),
    ],
)
def test_errors_map_to_documented_exit_statuses(error: Exception, status: int) -> None:
    assert isinstance(error, BlockPullError)
    assert cli.exit_status_for(error) == status
    assert f"  {status} " in cli.EPILOG


def test_global_options_go_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    before = cli.settings_from(parser.parse_args(["--output", "json", "--connect-timeout", "1", "jobs", "S"]))
    after = cli.settings_from(parser.parse_args(["jobs", "S", "-o", "json", "--connect-timeout", "1"]))
    default = cli.settings_from(parser.parse_args(["jobs", "S"]))
    assert before == after == cli.Settings(connect_timeout=1.0, output="json")
    assert default == cli.Settings()


def test_bandwidth_is_parsed_as_a_quantity() -> None:
    args = cli.build_parser().parse_args(["pull", "S", "vda", "--bandwidth", "1.5Mi"])
    assert args.bandwidth == 1572864
