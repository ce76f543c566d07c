"""The plugin's rows, frames and lines: never wider than the terminal, saying what happened."""

from __future__ import annotations

import io
from typing import Any

import pytest

from blockpull.kubectl import render
from blockpull.kubectl.model import Followed, Tracked
from blockpull.kubectl.render import LiveScreen, live_frame, live_row, outcome_line, plain_line

MiB = 2**20


def tracked(name: str = "web-1-root", ns: str = "vms", **status: Any) -> Tracked:
    conditions = [{"type": t, "status": "True"} for t in status.pop("true", [])]
    body = {
        "metadata": {"name": name, "namespace": ns, "uid": name},
        "spec": {"nodeName": "worker-3"},
        "status": {**status, "conditions": conditions},
    }
    followed = Followed()
    followed.snapshot([body], now=0.0)
    return followed.objects[(ns, name)]


RUNNING = {
    "phase": "Running",
    "reason": "Streaming",
    "progress": "45.12%",
    "offset": 45 * MiB,
    "length": 100 * MiB,
}
STATES = [
    {},
    RUNNING,
    {**RUNNING, "phase": "Paused", "reason": "Paused"},
    {**RUNNING, "phase": "Paused", "reason": "PausedOnErrorNospace"},
    {
        "phase": "Pending",
        "reason": "WaitingForVM",
        "message": "no socket at /run/blockpull/vms/web-1.qmp " * 3,
    },
    {
        "phase": "Completed",
        "progress": "100.00%",
        "message": "streamed 2.0 GiB from 2 backing images",
        "true": ["Completed"],
    },
    {
        "phase": "Failed",
        "reason": "IOError",
        "progress": "12.00%",
        "message": "Input/output error",
        "true": ["Failed"],
    },
]


@pytest.mark.parametrize("status", STATES)
def test_rows_never_exceed_the_width(status: dict[str, Any]) -> None:
    for width in range(20, 200, 7):
        for name_width in (4, 10, 40):
            row = live_row(tracked(**dict(status)), width, name_width, with_namespace=False)
            assert len(row) <= width, (width, row)


def test_a_running_row_has_bar_percent_amounts_rate_and_eta() -> None:
    row = live_row(tracked(**RUNNING), 120, 12, with_namespace=False)
    assert row.startswith("web-1-root    Running    [")
    assert row.endswith("45.12%    45.0 MiB / 100.0 MiB            --  ETA   --:--")


def test_a_narrow_row_drops_the_bar_first_and_keeps_the_percent_and_eta() -> None:
    row = live_row(tracked(**RUNNING), 60, 10, with_namespace=False)
    assert "[" not in row and "45.12%" in row and "ETA" in row


def test_paused_and_finished_rows_say_why() -> None:
    assert live_row(
        tracked(**{**RUNNING, "phase": "Paused", "reason": "Paused"}), 120, 10, with_namespace=False
    ).endswith("  paused")
    failed = live_row(tracked(**STATES[6]), 120, 10, with_namespace=False)
    assert failed == "web-1-root  Failed     IOError at 12.00%: Input/output error"
    nothing = live_row(tracked(), 120, 10, with_namespace=False)
    assert nothing == "web-1-root  New        no status yet: is the agent of node worker-3 running?"


def test_a_frame_fits_the_screen_and_sums_up_what_does_not_fit() -> None:
    rows = [tracked(f"done-{i}", **STATES[5]) for i in range(30)] + [tracked("busy", **RUNNING)]
    lines = live_frame(rows, width=80, height=10, title="t", note=None, with_namespace=False)
    assert len(lines) == 10
    assert all(len(line) < 80 for line in lines)
    assert any(line.startswith("busy ") for line in lines)  # the unfinished row stays in view
    assert lines[-2] == "... and 25 more: 25 completed"  # 31 rows, 6 shown
    assert lines[-1].startswith("Ctrl-C stops watching")


def test_lines_for_pipes_and_results() -> None:
    assert plain_line(tracked(**RUNNING), with_namespace=True) == (
        f"vms/web-1-root Running 45.12% ({45 * MiB}/{100 * MiB} bytes) rate -- eta --:--"
    )
    assert outcome_line(tracked(**STATES[5]), with_namespace=False) == (
        "blockpull.blockpull.dev/web-1-root Completed: streamed 2.0 GiB from 2 backing images"
    )
    assert outcome_line(tracked(**STATES[6]), with_namespace=True) == (
        "blockpull.blockpull.dev/web-1-root (namespace vms) Failed at 12.00%: IOError: Input/output error"
    )


def test_the_screen_is_restored_on_close() -> None:
    stream = io.StringIO()
    screen = LiveScreen(stream)
    screen.open()
    screen.draw(["a", "b"])
    screen.close()
    screen.close()  # twice is harmless
    text = stream.getvalue()
    assert text.startswith("\x1b[?1049h") and text.endswith("\x1b[?1049l")
    assert text.count("\x1b[?1049l") == 1
    assert "\x1b[Ha\x1b[K\r\nb\x1b[K\x1b[J" in text
    assert not render.is_terminal(stream)
