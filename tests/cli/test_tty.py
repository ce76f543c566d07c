"""On a terminal: a progress bar redrawn in place (`\\r`), as `virsh blockpull --verbose` does."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
import termios
import time

import pytest

from .support import SLOW, Lab, cli_argv, cli_env

pytestmark = pytest.mark.qemu

BAR = re.compile(
    r"\r(?P<job>\S+) \[(?P<bar>[#.]+)\] +(?P<pct>\d+\.\d\d)% .*?(?P<tail>ETA +\S+|completed)\x1b\[K"
)


def _take_terminal() -> None:
    # In the child, before exec: make the pty (already its stdin) the controlling terminal of
    # its new session, so that a ^C typed on it becomes SIGINT for the process, as in a shell.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def run_in_pty(
    argv: list[str], *, columns: int = 100, timeout: float = 30.0, ctrl_c_after_bars: int | None = None
) -> tuple[int, str]:
    """Run with stdin, stdout and stderr on a pseudo-terminal; its exit and everything it drew.

    With `ctrl_c_after_bars`, type ^C on the terminal once that many bar frames were drawn.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        argv,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=cli_env(TERM="xterm"),
        close_fds=True,
        start_new_session=True,
        preexec_fn=_take_terminal,  # noqa: PLW1509 - only an ioctl, nothing that could deadlock
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: every writer of the terminal has gone
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
            drawn = b"".join(chunks).decode(errors="replace")
            if ctrl_c_after_bars is not None and len(BAR.findall(drawn)) >= ctrl_c_after_bars:
                os.write(master, b"\x03")
                ctrl_c_after_bars = None
        status = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return status, b"".join(chunks).decode(errors="replace")


def test_the_progress_bar_is_redrawn_on_one_line(slow_lab: Lab) -> None:
    status, drawn = run_in_pty([*cli_argv(), "pull", slow_lab.socket, slow_lab.top, "--bandwidth", SLOW])

    assert status == 0, drawn
    bars = list(BAR.finditer(drawn))
    assert len(bars) >= 3, drawn
    percents = [float(bar["pct"]) for bar in bars]
    assert percents == sorted(percents) and len(set(percents)) >= 3, percents
    assert {bar["job"] for bar in bars} == {bars[0]["job"]}
    assert len({len(bar.group(0)) for bar in bars}) == 1, "fixed width: the bar does not jitter"
    assert all(len(bar.group(0)) - len("\r\x1b[K") < 100 for bar in bars), "fits the terminal"
    last = bars[-1]
    assert last["tail"] == "completed" and last["pct"] == "100.00" and "." not in last["bar"]
    assert "\n" not in drawn[bars[0].start() : last.end()], "redrawn in place, not scrolled"
    assert drawn[last.end() :].lstrip("\r\n").startswith(f"completed: job {last['job']} pulled disk")
    assert slow_lab.jobs() == []
    slow_lab.stop()
    slow_lab.assert_intact_and_unchanged()
    assert slow_lab.backing_names() == []


def test_ctrl_c_on_the_terminal_cancels_the_job(slow_lab: Lab) -> None:
    status, drawn = run_in_pty(
        [*cli_argv(), "pull", slow_lab.socket, slow_lab.top, "--bandwidth", SLOW], ctrl_c_after_bars=2
    )

    assert status == 130, drawn
    assert "blockpull: SIGINT: cancelling job" in drawn
    assert "blockpull: error: interrupted by SIGINT" in drawn and "Traceback" not in drawn
    assert slow_lab.jobs() == []
    assert slow_lab.vm.alive
    slow_lab.stop()
    slow_lab.assert_intact_and_unchanged()
    assert len(slow_lab.backing_names()) == 3
