"""`kubectl blockpull watch` on a real terminal, tried as a person would: run it in tmux, look at
the pane while the pulls move, resize the window, count rows that do not fit, read what stays
on the screen afterwards."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import AgentProcess, Namespace, VMFactory, eventually
from test_kubectl_plugin import argv, plugin_env

from qemulab import Chain
from qemulab.tmpdirs import remove_tree, short_tmpdir

MiB = 1 << 20
BAR = re.compile(r"\[(#*)(\.*)\]")


class Tmux:
    """One tmux server of our own (its own socket), one window running one command."""

    def __init__(self, socket: Path, command: list[str], *, width: int, height: int) -> None:
        self.socket = socket
        shell = f"{shlex.join(command)}; echo EXIT=$?; sleep 600"
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), shell)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
            env=plugin_env(TERM="xterm-256color"),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    def pane(self) -> list[str]:
        """What a person sees now, line by line (trailing blanks dropped)."""
        return self._tmux("capture-pane", "-p", "-t", "t").rstrip("\n").split("\n")

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(width), "-y", str(height))

    def send_keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, check=False)


@pytest.fixture
def tmux_dir() -> Iterator[Path]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing: scripts/setup.sh installs it")
    path = short_tmpdir("bpt-")
    try:
        yield path
    finally:
        remove_tree(path)


def rows_of(lines: list[str], names: list[str]) -> dict[str, str]:
    return {name: next((ln for ln in lines if ln.startswith(name + " ")), "") for name in names}


def filled(row: str) -> int:
    match = BAR.search(row)
    return len(match.group(1)) if match else -1


def check_frame(lines: list[str], width: int, height: int, names: list[str]) -> None:
    """A clean frame: the title first, each line one known kind, none wider than the window."""
    assert len(lines) <= height
    assert lines[0].startswith("blockpulls in namespace "), lines
    for line in lines:
        assert len(line) < width, (width, line)
        kinds = (
            line == "",
            line.startswith("blockpulls in namespace "),
            any(line.startswith(name + " ") for name in names),
            line.startswith("... and ") and " more: " in line,
            line.startswith(("Ctrl-C stops watching", "watch: ")),
        )
        assert any(kinds), f"garbled line {line!r} in\n" + "\n".join(lines)
    assert sum(line.startswith("blockpulls in namespace ") for line in lines) == 1


def redrawn(tmux: Tmux, width: int, height: int, names: list[str]) -> list[str]:
    """The pane once the view has redrawn itself for a new size (then checked by the caller)."""

    def clean() -> list[str] | None:
        lines = tmux.pane()
        try:
            check_frame(lines, width, height, names)
        except AssertionError:
            return None
        return lines

    try:
        return list(eventually(clean, timeout=10, what=f"a frame for {width}x{height}"))
    except AssertionError:
        return tmux.pane()  # the caller's check_frame says what is wrong with it


def test_watch_on_a_terminal_moves_bars_survives_resizes_and_many_rows(
    ns: Namespace,
    agent: AgentProcess,
    chain_factory: Callable[..., Chain],
    vm_in: VMFactory,
    tmux_dir: Path,
) -> None:
    chains = [chain_factory(layers=3, size=64 * MiB, pattern="spread", data_bytes=16 * MiB) for _ in range(3)]
    vm_in("web-1", chains)
    # The failing ones on a VM of their own: the agent does not resolve disks on a VM while one
    # of its jobs runs (they would wait Pending/QEMUUnavailable until the pulls end).
    vm_in("web-2", [chain_factory(layers=2)])
    running = [f"pull-{i}" for i in range(3)]
    failing = [f"bad-{i}" for i in range(5)]
    for name, chain in zip(running, chains, strict=True):
        ns.create(
            name, nodeName="node-a", vm="web-1", disk=str(chain.top), bandwidth="1Mi"
        )  # 16 s: still running through the resizes
    for name in failing:
        ns.create(name, nodeName="node-a", vm="web-2", disk=f"no-{name}")
    names = running + failing
    for name in running:
        ns.wait_phase(name, "Running")
    for name in failing:
        ns.wait_phase(name, "Failed")

    tmux = Tmux(tmux_dir / "sock", argv(ns, "watch"), width=110, height=20)
    try:
        # Bars move: the same row, later, has more of its bar filled.
        def bars() -> dict[str, str] | None:
            rows = rows_of(tmux.pane(), names)
            return rows if all(filled(rows[n]) >= 0 for n in running) else None

        first = eventually(bars, timeout=20, what="a bar per running pull")
        eventually(
            lambda: all(filled(rows_of(tmux.pane(), names)[n]) > filled(first[n]) for n in running),
            timeout=20,
            what="bars moving",
        )
        lines = tmux.pane()
        check_frame(lines, 110, 20, names)
        rows = rows_of(lines, names)
        for name in running:
            assert re.search(
                r"\]\s+\d+\.\d\d%\s+[\d.]+ MiB / 64\.0 MiB\s+[\d.]+ (KiB|MiB)/s\s+ETA\s+\d+:\d\d$", rows[name]
            ), rows[name]
        for name in failing:  # finished rows say their outcome and why
            assert re.match(rf"{name} +Failed +DiskNotFound: ", rows[name]), rows[name]

        # Narrower and shorter than the rows need: still one clean frame, the rest summed up.
        tmux.resize(60, 8)
        lines = redrawn(tmux, 60, 8, names)
        check_frame(lines, 60, 8, names)
        assert any(line.startswith("... and ") for line in lines), lines
        shown = [n for n in names if rows_of(lines, names)[n]]
        assert set(running) <= set(shown), lines  # unfinished rows are the ones kept in view
        tmux.resize(90, 24)
        lines = redrawn(tmux, 90, 24, names)
        check_frame(lines, 90, 24, names)
        assert all(rows_of(lines, names).values()), lines

        for name in running:
            ns.patch_spec(name, bandwidth="512Mi")

        # Back on the normal screen: one outcome line per object, then the exit status.
        def returned() -> list[str] | None:
            lines = tmux.pane()
            return lines if any(line.startswith("EXIT=") for line in lines) else None

        after = eventually(returned, timeout=60, what="watch returned")
        text = "\n".join(after)
        assert "EXIT=1" in after, text  # five failed
        for name in running:
            assert f"blockpull.blockpull.dev/{name} Completed: " in text
        for name in failing:
            assert f"blockpull.blockpull.dev/{name} Failed: DiskNotFound: " in text
        assert "\x1b" not in text and "blockpulls in namespace" not in text  # the live view is gone
    finally:
        tmux.kill()


def test_ctrl_c_restores_the_terminal_and_leaves_the_pull_running(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory, tmux_dir: Path
) -> None:
    vm_in("web-1", [slow_chain])
    ns.create("slow", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="1Mi")
    ns.wait_phase("slow", "Running")
    tmux = Tmux(tmux_dir / "sock", argv(ns, "wait", "slow"), width=100, height=12)
    try:
        # `wait` on a terminal shows the same live view (on stderr) while it waits.
        eventually(lambda: filled(rows_of(tmux.pane(), ["slow"])["slow"]) >= 0, timeout=20, what="a bar")
        tmux.send_keys("C-c")

        def returned() -> list[str] | None:
            lines = tmux.pane()
            return lines if any(line.startswith("EXIT=") for line in lines) else None

        after = eventually(returned, timeout=20, what="wait interrupted")
        assert "EXIT=130" in after, after
        assert not any(line.startswith("slow ") for line in after)  # the live view is gone
        assert ns.status("slow")["phase"] == "Running"  # Ctrl-C stops watching, not the pull
    finally:
        tmux.kill()


def test_watch_on_a_terminal_says_when_its_watch_is_lost_and_carries_on(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory, tmux_dir: Path
) -> None:
    api = ns.cluster.stand_in
    if api is None:
        pytest.skip("needs the stand-in to refuse the plugin's watches")
    vm_in("web-1", [slow_chain])
    ns.create("slow", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="1Mi")
    ns.wait_phase("slow", "Running")
    user = f"plugin-tty-{ns.name}"
    config = ns.cluster.kubeconfig_for(user)
    tmux = Tmux(tmux_dir / "sock", argv(ns, "watch", kubeconfig=config), width=100, height=12)
    try:
        eventually(lambda: filled(rows_of(tmux.pane(), ["slow"])["slow"]) >= 0, timeout=20, what="a bar")
        rule = api.inject_failures(user=user, verb="watch", status=503, count=None)
        api.call(api.server.hub.close_all)
        lost = eventually(
            lambda: (lines := tmux.pane())[-1].startswith("watch: the API server answered 503") and lines,
            timeout=20,
            what="the lost watch said on the last line",
        )
        check_frame(lost, 100, 12, ["slow"])
        assert len(rule.hits) >= 1
        rule.remaining = 0  # the API server is back
        eventually(
            lambda: tmux.pane()[-1].startswith("Ctrl-C stops watching"), timeout=20, what="the note cleared"
        )
        ns.patch_spec("slow", bandwidth="512Mi")  # a change made after the outage is seen

        def returned() -> list[str] | None:
            lines = tmux.pane()
            return lines if any(line.startswith("EXIT=") for line in lines) else None

        after = eventually(returned, timeout=30, what="watch returned")
        assert "EXIT=0" in after, after
        assert any(line.startswith("blockpull.blockpull.dev/slow Completed: ") for line in after)
    finally:
        tmux.kill()
