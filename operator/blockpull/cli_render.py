"""What the `blockpull` command shows: progress displays, result lines, tables and JSON.

Owns every byte the CLI writes, apart from argparse's own usage messages: the progress bar
redrawn in place on a terminal, the rate-limited plain progress lines for logs and pipes, the
final outcome line, the `jobs` and `chain` tables, and the JSON documents of `--output json`.
It knows nothing about QMP; it renders the engine's plain data (`Progress`, `Outcome`,
`ChainImage`) and the CLI's own `Report`.

Progress goes to stderr (as `virsh blockpull --verbose` does), results to stdout, so that
`blockpull pull ... > result.json` captures only the result.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from blockpull.driver import ChainImage, Outcome, Progress
from blockpull.pull import outcome_of
from blockpull.quantity import format_bytes, progress_text

#: Plain progress lines: at most one per this many seconds (plus the final one).
PLAIN_LINE_INTERVAL = 1.0
#: The rate (and so the ETA) is the offset's movement over this trailing window.
RATE_WINDOW = 5.0


# --- progress -------------------------------------------------------------------------------


class ProgressDisplay(Protocol):
    """Shows a running job's progress; `finish` is called once, before the result is printed."""

    def update(self, job: Progress) -> None: ...

    def finish(self, outcome: Outcome | None = None) -> None: ...


class NoProgress:
    """`--quiet`, or nothing to show."""

    def update(self, job: Progress) -> None:
        pass

    def finish(self, outcome: Outcome | None = None) -> None:
        pass


@dataclass
class RateMeter:
    """Offset speed over a trailing window, and the ETA it implies.

    QEMU's offset also moves across unallocated holes, so this is progress speed, not bytes
    copied per second; it is what predicts the remaining time.
    """

    window: float = RATE_WINDOW
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, offset: int) -> None:
        if self._samples and offset < self._samples[-1][1]:
            self._samples.clear()  # a restarted job; never show a negative rate
        self._samples.append((now, offset))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, o0), (t1, o1) = self._samples[0], self._samples[-1]
        return (o1 - o0) / (t1 - t0) if t1 > t0 else None

    def eta(self, remaining: int) -> float | None:
        rate = self.rate()
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate else None


def format_duration(seconds: float | None) -> str:
    """`0:04`, `12:30`, `1:02:03`; `--:--` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds > 100 * 3600:
        return "--:--"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(rate: float | None) -> str:
    return "--" if rate is None else f"{format_bytes(rate)}/s"


def _state_note(job: Progress) -> str:
    """Why a job is not simply running, in a few words (empty when it is)."""
    if job.paused or job.status == "paused":
        if job.io_status not in ("ok", ""):
            return f"paused by QEMU: I/O {job.io_status}"
        return "paused"
    if job.status not in ("running", "created"):
        return job.status
    return ""


class ProgressBar:
    """A single line redrawn in place with `\\r` on a terminal: bar, percent, bytes, rate, ETA."""

    def __init__(self, stream: TextIO, label: str, clock: Any = time.monotonic) -> None:
        self._stream = stream
        self._label = label
        self._clock = clock
        self._meter = RateMeter()
        self._last = ""
        self._drawn = False

    def update(self, job: Progress) -> None:
        self._meter.add(self._clock(), job.offset)
        line = self.line(job)
        if line != self._last:
            self._stream.write("\r" + line + "\x1b[K")
            self._stream.flush()
            self._last = line
            self._drawn = True

    def line(self, job: Progress, final: str | None = None) -> str:
        """The bar's text for `job`, as wide as the terminal allows.

        On a narrow terminal the bar goes first, then bytes and rate; the percentage and the
        ETA (or why the job is not running, or how it ended) always stay.
        """
        # Fixed-width fields, so that the bar does not jitter as the numbers change.
        pct = f" {progress_text(job.offset, job.length):>7}"
        amounts = f"  {format_bytes(job.offset):>10} / {format_bytes(job.length)}"
        rate = f"  {format_rate(self._meter.rate()):>12}"
        note = final or _state_note(job)
        end = f"  {note}" if note else f"  ETA {format_duration(self._meter.eta(job.length - job.offset)):>7}"
        width = _terminal_width(self._stream) - 1
        tail = pct + amounts + rate + end
        room = width - len(self._label) - len(tail) - 3
        if room >= 10:
            filled = int(room * min(job.percent, 100.0) / 100.0)
            return f"{self._label} [{'#' * filled}{'.' * (room - filled)}]{tail}"
        for text in (self._label + tail, self._label + pct + end, self._label + pct):
            if len(text) <= width:
                return text
        return (self._label + pct)[:width]

    def finish(self, outcome: Outcome | None = None) -> None:
        """End the bar's line; with the outcome, redraw it one last time as the job ended."""
        if not self._drawn:
            return
        if outcome is not None:
            final = _final_progress(outcome)
            self._stream.write("\r" + self.line(final, outcome.result.value) + "\x1b[K")
        self._stream.write("\n")
        self._stream.flush()
        self._drawn = False


class PlainProgress:
    """One line per change of progress, at most one per `interval` seconds, for logs and pipes."""

    def __init__(
        self,
        stream: TextIO,
        label: str,
        interval: float = PLAIN_LINE_INTERVAL,
        clock: Any = time.monotonic,
    ) -> None:
        self._stream = stream
        self._label = label
        self._interval = interval
        self._clock = clock
        self._meter = RateMeter()
        self._printed: tuple[int, str] | None = None
        self._next = 0.0
        self._pending: Progress | None = None

    def update(self, job: Progress) -> None:
        now = self._clock()
        self._meter.add(now, job.offset)
        state = (job.offset, _state_note(job))
        if state == self._printed:
            return
        if now < self._next:
            self._pending = job  # shown at the next permitted time, or by finish()
            return
        self._write(job)
        self._printed = state
        self._pending = None
        self._next = now + self._interval

    def line(self, job: Progress) -> str:
        note = _state_note(job)
        text = (
            f"{self._label}: {progress_text(job.offset, job.length):>7} ({job.offset}/{job.length} bytes, "
            f"{format_bytes(job.offset)} of {format_bytes(job.length)}) "
            f"rate {format_rate(self._meter.rate())} "
            f"eta {format_duration(self._meter.eta(job.length - job.offset))}"
        )
        return f"{text} [{note}]" if note else text

    def _write(self, job: Progress) -> None:
        self._stream.write(self.line(job) + "\n")
        self._stream.flush()

    def finish(self, outcome: Outcome | None = None) -> None:
        if self._pending is not None:
            self._write(self._pending)
            self._pending = None


def _final_progress(outcome: Outcome) -> Progress:
    return Progress(
        job_id=outcome.job_id,
        status="concluded",
        offset=outcome.offset,
        length=outcome.length,
        speed=0,
        paused=False,
        io_status="ok",
        error=outcome.error,
    )


def progress_display(stream: TextIO, label: str, *, quiet: bool) -> ProgressDisplay:
    """The bar on a terminal, plain lines otherwise, nothing with `--quiet`."""
    if quiet:
        return NoProgress()
    if _isatty(stream) and os.environ.get("TERM") != "dumb":
        return ProgressBar(stream, label)
    return PlainProgress(stream, label)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _terminal_width(stream: TextIO) -> int:
    try:
        return max(40, os.get_terminal_size(stream.fileno()).columns)
    except (AttributeError, ValueError, OSError):
        return 80


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What a `pull`, `wait` or `abort` ended with: the outcome plus what the CLI knows around it."""

    outcome: Outcome
    elapsed: float | None = None
    #: The disk as the user named it and the node streamed into (pull only).
    disk: str | None = None
    device: str | None = None
    base: str | None = None
    base_node: str | None = None
    #: Images the disk no longer needs after a completed pull.
    released_images: tuple[str, ...] = ()
    #: `timeout`, `SIGINT`, `SIGTERM`, `SIGHUP` or `abort` when the CLI asked for the cancel.
    stopped_by: str | None = None
    #: The outcome was already there when we looked (the job ended while nobody followed it).
    already_concluded: bool = False

    def as_json(self) -> dict[str, Any]:
        outcome = self.outcome
        return {
            "job_id": outcome.job_id,
            "result": outcome.result.value,
            "error": outcome.error,
            "offset": outcome.offset,
            "length": outcome.length,
            "progress": progress_text(outcome.offset, outcome.length),
            "elapsed_seconds": None if self.elapsed is None else round(self.elapsed, 3),
            "disk": self.disk,
            "device": self.device,
            "base": self.base,
            "base_node": self.base_node,
            "released_images": list(self.released_images),
            "stopped_by": self.stopped_by,
            "already_concluded": self.already_concluded,
        }


def outcome_line(report: Report) -> str:
    """The one-line story of how the job ended, for stdout (text output)."""
    outcome = report.outcome
    job = outcome.job_id
    where = f"{progress_text(outcome.offset, outcome.length)} ({outcome.offset}/{outcome.length} bytes)"
    took = f" in {report.elapsed:.1f}s" if report.elapsed is not None else ""
    already = " (it had ended before we looked)" if report.already_concluded else ""
    result = outcome.result.value
    if result == "completed":
        raced = " (the cancel lost the race)" if report.stopped_by else ""
        size = format_bytes(outcome.length)
        if report.disk is None:
            return f"completed{raced}: job {job} ({size}){took}{already}"
        backing = f"now backed by {report.base}" if report.base else "it no longer has a backing file"
        released = (
            f"; no longer needed: {', '.join(report.released_images)}" if report.released_images else ""
        )
        return (
            f"completed{raced}: job {job} pulled disk {report.disk!r} (node {report.device}, {size})"
            f"{took}{already}; {backing}{released}"
        )
    if result == "cancelled":
        kept = "the disk keeps its backing chain with the data copied so far"
        if report.stopped_by == "timeout":
            return f"timed out{took}: cancelled job {job} at {where}; {kept}"
        if report.stopped_by in (None, "abort"):
            return f"cancelled: job {job} stopped at {where}{took}{already}; {kept}"
        return f"interrupted by {report.stopped_by}{took}: cancelled job {job} at {where}; {kept}"
    return f"failed: job {job} at {where}{took}{already}: {outcome.error}; the disk keeps its backing chain"


def started_line(job_id: str, device: str, base_node: str | None) -> str:
    base = f" down to base node {base_node}" if base_node else ""
    return f"started job {job_id} streaming into node {device}{base}"


# --- tables ---------------------------------------------------------------------------------


def job_json(job: Progress) -> dict[str, Any]:
    outcome = outcome_of(job)
    return {
        "id": job.job_id,
        "type": job.job_type,
        "status": job.status,
        "result": outcome.result.value if outcome else None,
        "progress": progress_text(job.offset, job.length),
        "offset": job.offset,
        "length": job.length,
        "speed": job.speed,
        "paused": job.paused,
        "io_status": job.io_status,
        "error": job.error,
    }


def jobs_table(jobs: Sequence[Progress], socket: str = "SOCKET") -> str:
    if not jobs:
        return "no block jobs"
    notes = [
        f"{job.job_id}: copy done, the backing chain unchanged until `blockpull wait {socket} {job.job_id}` "
        "finalizes, reports and dismisses it"
        for job in jobs
        if job.pending
    ]
    rows = [["JOB", "TYPE", "STATUS", "RESULT", "PROGRESS", "OFFSET/LEN", "SPEED", "PAUSED", "IO", "ERROR"]]
    for job in jobs:
        doc = job_json(job)
        rows.append(
            [
                job.job_id,
                job.job_type or "-",
                job.status,
                doc["result"] or "-",
                doc["progress"],
                f"{job.offset}/{job.length}",
                format_rate(job.speed) if job.speed else "unlimited",
                "yes" if job.paused else "no",
                job.io_status,
                job.error or "-",
            ]
        )
    return "\n".join([_table(rows), *notes])


def chain_json(disk: str, chain: Sequence[ChainImage]) -> dict[str, Any]:
    return {
        "disk": disk,
        "device": chain[0].node if chain else None,
        "images": [
            {
                "node_name": image.node,
                "filename": image.filename,
                "format": image.driver,
                "backing_name": image.backing_name,
                "virtual_size": image.virtual_size,
            }
            for image in chain
        ],
    }


def chain_table(chain: Sequence[ChainImage]) -> str:
    rows = [["#", "NODE", "FORMAT", "SIZE", "FILE", "BACKING (as recorded)"]]
    for index, image in enumerate(chain):
        rows.append(
            [
                str(index),
                image.node,
                image.driver,
                format_bytes(image.virtual_size),
                image.filename,
                image.backing_name or "-",
            ]
        )
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


# --- output ---------------------------------------------------------------------------------


def dump_json(stream: TextIO, document: Any) -> None:
    stream.write(json.dumps(document, indent=2) + "\n")
    stream.flush()


def error_line(stream: TextIO, message: str) -> None:
    """The one line every failure gets, `blockpull: error: ...`, however long the message."""
    stream.write("blockpull: error: " + " ".join(message.split()) + "\n")
    stream.flush()


def warning_line(stream: TextIO, message: str) -> None:
    stream.write("blockpull: warning: " + " ".join(message.split()) + "\n")
    stream.flush()
