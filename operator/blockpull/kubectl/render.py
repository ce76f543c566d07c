"""What the plugin shows: live-view rows, plain progress lines, outcome lines, the live screen.

Rows and lines are pure functions of `model.Tracked` and a width, so they are unit-tested
without a terminal. Rate, ETA, byte amounts and the bar come from `blockpull.cli_render`, the
node CLI's renderer, so both commands read the same; the percentage is the agent's own
`status.progress` (truncated, `100.00%` only when done).

`LiveScreen` draws frames on a terminal's alternate screen, each frame from the top-left
corner, every line cut to the width and the rows to the height. A resize or a hundred rows
therefore cannot leave a half-overwritten line behind, which redrawing in place below the
prompt cannot promise (terminals differ in how they re-wrap old lines on a resize). When the
view ends it leaves the alternate screen, and the caller prints the outcome lines to the
normal screen, where they stay.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, TextIO

from blockpull.cli_render import bar_text, format_duration, format_rate
from blockpull.kubectl.config import KIND_PREFIX
from blockpull.kubectl.model import Outcome, Tracked
from blockpull.quantity import format_bytes

PHASE_WIDTH = 9
#: Narrowest bar worth drawing; below this the row goes without one.
MIN_BAR = 12
NAME_MAX = 40


def object_ref(tracked: Tracked, *, with_namespace: bool) -> str:
    pull = tracked.pull
    ref = f"{KIND_PREFIX}/{pull.name}"
    return f"{ref} (namespace {pull.namespace})" if with_namespace else ref


def label(tracked: Tracked, *, with_namespace: bool) -> str:
    pull = tracked.pull
    return f"{pull.namespace}/{pull.name}" if with_namespace else pull.name


def state_word(tracked: Tracked) -> str:
    """The phase column: the outcome once there is one, else the phase (`New`: no status yet)."""
    if tracked.outcome is not None:
        return tracked.outcome.value
    if tracked.pull.deleting:
        return "Deleting"
    return tracked.pull.phase or "New"


def _where(tracked: Tracked) -> str:
    return f" at {tracked.pull.progress}" if tracked.pull.progress else ""


def detail(tracked: Tracked) -> str:
    """Why it is where it is, for an object without a bar (pending, finished, deleted)."""
    pull = tracked.pull
    outcome = tracked.outcome
    if outcome is Outcome.COMPLETED:
        return f"{pull.progress or '100.00%'}  {pull.message}".rstrip()
    if outcome is Outcome.FAILED:
        return f"{pull.reason}{_where(tracked)}: {pull.message}"
    if outcome is Outcome.DELETED:
        return f"deleted before it finished ({pull.phase or 'no status'}{_where(tracked)})"
    if not pull.phase:
        return "no status yet: is the agent of node " + (pull.node or "?") + " running?"
    return f"{pull.reason}: {pull.message}" if pull.message else pull.reason


def live_row(tracked: Tracked, width: int, name_width: int, *, with_namespace: bool) -> str:
    """One row of the live view, never wider than `width`."""
    pull = tracked.pull
    name = _fit(label(tracked, with_namespace=with_namespace), name_width).ljust(name_width)
    head = f"{name}  {state_word(tracked):<{PHASE_WIDTH}}  "
    fraction = pull.fraction
    if tracked.outcome is None and pull.phase in ("Running", "Paused") and fraction is not None:
        pct = f"{pull.progress:>7}"
        amounts = f"  {format_bytes(pull.offset or 0):>10} / {format_bytes(pull.length or 0)}"
        if pull.phase == "Paused":
            rate, end = "", (f"  paused ({pull.reason})" if pull.reason != "Paused" else "  paused")
        else:
            rate, end = f"  {format_rate(tracked.rate()):>12}", f"  ETA {format_duration(tracked.eta()):>7}"
        # As the node CLI's bar: on a narrow terminal the bar goes first, then the amounts,
        # then the rate; the percentage and the ETA (or why it is paused) always stay.
        room = width - len(head) - 1 - len(pct + amounts + rate + end)
        if room >= MIN_BAR:
            return f"{head}{bar_text(fraction, room)} {pct}{amounts}{rate}{end}"
        for text in (pct + amounts + rate + end, pct + rate + end, pct + end, pct):
            if len(head) + len(text) <= width:
                return head + text
        return _fit(head + pct, width)
    return _fit(head + detail(tracked), width)


def live_frame(
    rows: Sequence[Tracked],
    *,
    width: int,
    height: int,
    title: str,
    note: str | None,
    with_namespace: bool,
) -> list[str]:
    """The whole screen: a title, the rows that fit (unfinished first when not all do), a footer."""
    width = max(20, width - 1)  # never the last column: some terminals wrap there
    footer = note or "Ctrl-C stops watching; the pulls go on."
    room = max(1, height - 3)
    shown = list(rows)
    hidden: list[Tracked] = []
    if len(shown) > room:
        by_need = sorted(shown, key=lambda t: t.outcome is not None)  # stable: keeps order within
        keep = {id(t) for t in by_need[: room - 1]}
        hidden = [t for t in shown if id(t) not in keep]
        shown = [t for t in shown if id(t) in keep]
    names = [label(t, with_namespace=with_namespace) for t in shown] or [""]
    name_width = min(NAME_MAX, max(len(n) for n in names), max(8, width // 3))
    lines = [_fit(title, width), ""]
    lines += [live_row(t, width, name_width, with_namespace=with_namespace) for t in shown]
    if hidden:
        lines.append(_fit(f"... and {len(hidden)} more: {summary(hidden)}", width))
    lines.append(_fit(footer, width))
    return lines[:height]


def summary(rows: Sequence[Tracked]) -> str:
    counts: dict[str, int] = {}
    for tracked in rows:
        word = state_word(tracked)
        counts[word] = counts.get(word, 0) + 1
    order = ["New", "Pending", "Running", "Paused", "Deleting", "Completed", "Failed", "Deleted"]
    return ", ".join(f"{counts[w]} {w.lower()}" for w in order if w in counts) or "none"


def plain_line(tracked: Tracked, *, with_namespace: bool) -> str:
    """One line per change for logs and pipes, `kubectl get -w` style."""
    pull = tracked.pull
    name = label(tracked, with_namespace=with_namespace)
    if tracked.outcome is None and pull.phase == "Running" and pull.offset is not None:
        return (
            f"{name} Running {pull.progress} ({pull.offset}/{pull.length} bytes) "
            f"rate {format_rate(tracked.rate())} eta {format_duration(tracked.eta())}"
        )
    return f"{name} {state_word(tracked)} {detail(tracked)}".rstrip()


def outcome_line(tracked: Tracked, *, with_namespace: bool) -> str:
    """The result of one object, for stdout: `blockpull.blockpull.dev/NAME Completed: ...`."""
    ref = object_ref(tracked, with_namespace=with_namespace)
    pull = tracked.pull
    outcome = tracked.outcome
    if outcome is Outcome.COMPLETED:
        return f"{ref} Completed: {pull.message or 'the disk no longer needs its backing images'}"
    if outcome is Outcome.FAILED:
        return f"{ref} Failed{_where(tracked)}: {pull.reason}: {pull.message}"
    if outcome is Outcome.DELETED:
        return f"{ref} deleted before it finished ({pull.phase or 'no status'}{_where(tracked)})"
    return f"{ref} {state_word(tracked)}{_where(tracked)}: {pull.reason or 'no status yet'}"


def _fit(text: str, width: int) -> str:
    text = " ".join(text.split()) if "\n" in text or "\t" in text else text
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


# --- the terminal -----------------------------------------------------------------------------


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
    except (AttributeError, ValueError):
        return False


class LiveScreen:
    """Frames on the alternate screen of the terminal behind `stream`; restores it on close."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._resized = threading.Event()
        self._previous: Any = None
        self._open = False

    def open(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGWINCH, self._on_resize)
        # Alternate screen, cursor hidden, no line wrap (a too-long line cannot push the frame).
        self._stream.write("\x1b[?1049h\x1b[?25l\x1b[?7l")
        self._stream.flush()
        self._open = True

    def _on_resize(self, signum: int, frame: FrameType | None) -> None:
        self._resized.set()

    def take_resize(self) -> bool:
        """True once after each resize (so the caller redraws at once)."""
        if self._resized.is_set():
            self._resized.clear()
            return True
        return False

    def size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self._stream.fileno())
            return max(20, size.columns), max(5, size.lines)
        except (AttributeError, ValueError, OSError):
            return 80, 24

    def draw(self, lines: Sequence[str]) -> None:
        # Home, each line then erase-to-end-of-line, then erase everything below: one write.
        body = "\x1b[K\r\n".join(lines)
        self._stream.write(f"\x1b[H{body}\x1b[K\x1b[J")
        self._stream.flush()

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._stream.write("\x1b[?7h\x1b[?25h\x1b[?1049l")
        self._stream.flush()
        if isinstance(self._previous, int) or callable(self._previous):
            signal.signal(signal.SIGWINCH, self._previous)
