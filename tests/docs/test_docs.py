"""The documentation against the code: the tables that describe code, links, and scope.

Pure and fast (no QEMU, no API server): each test reads a Markdown file and the code it
describes, so a change to one without the other fails here instead of misleading a user.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from blockpull import cli, errors
from blockpull.agent import settings as agent_settings
from blockpull.agent.settings import AgentSettings
from blockpull.errors import BlockPullError, InvalidSpec

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
AGENT = REPO / "operator" / "blockpull" / "agent"
README = REPO / "README.md"
CONTRIBUTING = REPO / "CONTRIBUTING.md"

#: Pages that other branches add (libvirt, GitOps and metrics, the kubectl plugin). Links to
#: them are allowed while they do not exist yet; once a page exists its links and anchors are
#: checked like any other. Drop an entry when its page has landed.
PAGES_FROM_OTHER_BRANCHES = frozenset({"docs/libvirt.md"})
#: Error reasons that never become a BlockPull's status reason, and why.
NOT_A_STATUS_REASON = {
    # The agent judges a vanished job from the disk's chain: Completed, or Failed/Cancelled.
    "JobNotFound": "a vanished job becomes Completed or Cancelled",
    # Raised only by a driver that lacks a feature; QMP has them all (docs/libvirt.md).
    "Unsupported": "not raised over QMP",
}
#: QEMU's io-status values of a job it paused after an error (`ok` is a user's pause).
IO_STATUSES_ON_ERROR = ("failed", "nospace")


# --- reading Markdown ---------------------------------------------------------------------


def markdown_files() -> list[Path]:
    return [README, CONTRIBUTING, *sorted(DOCS.glob("*.md"))]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def without_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked (their lines kept, so line counts stay)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every ATX heading outside code blocks."""
    found = []
    for line in without_code_blocks(text).splitlines():
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            found.append((len(match[1]), match[2]))
    return found


def section(text: str, title: str) -> str:
    """The body of the heading `title`, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*$", line)
        if match and match[2] == title:
            level = len(match[1])
            body = []
            for rest in lines[index + 1 :]:
                deeper = re.match(r"^(#{1,6})\s", rest)
                if deeper and len(deeper[1]) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"no heading {title!r}")


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `text` (header and separator dropped)."""
    block: list[str] = []
    for line in without_code_blocks(text).splitlines():
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    assert len(block) >= 2, "no table"
    return [_cells(line) for line in block[2:]]


def _cells(line: str) -> list[str]:
    # `\|` is a literal bar inside a cell (e.g. `report \| stop`).
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [part.strip().replace("\\|", "|") for part in parts]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, title in headings(read(path)):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


# --- reading the code ---------------------------------------------------------------------


class RecordingEnv(Mapping[str, str]):
    """An environment that notes every variable looked up in it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def agent_sources() -> dict[str, str]:
    return {path.name: read(path) for path in sorted(AGENT.glob("*.py"))}


def variables_the_agent_reads() -> set[str]:
    env = RecordingEnv({"NODE_NAME": "node-a"})
    AgentSettings.from_env(env)
    found = set(env.read)
    for source in agent_sources().values():
        # Outside the settings object (the Kubernetes client's configuration in __main__).
        found.update(re.findall(r"""os\.environ(?:\.get\(|\[)\s*"([A-Z][A-Z0-9_]*)\"""", source))
        found.update(re.findall(r"""getenv\(\s*"([A-Z][A-Z0-9_]*)\"""", source))
        # A variable named anywhere as a literal of its own (read conditionally, say).
        found.update(re.findall(r'"(BLOCKPULL_[A-Z0-9_]+)"', source))
    return found


def error_classes() -> list[type[BlockPullError]]:
    """Every concrete error of `blockpull.errors` (the bases carry the placeholder reason)."""
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BlockPullError)
        and cls.__module__ == errors.__name__
        and cls.reason != BlockPullError.reason
    ]


def error_reasons() -> set[str]:
    return {cls.reason for cls in error_classes()}


def agent_event_reasons(kinds: tuple[str, ...] = ("Normal", "Warning")) -> set[str]:
    found: set[str] = set()
    for source in agent_sources().values():
        found.update(re.findall(rf'"(?:{"|".join(kinds)})",\s*"([A-Z][A-Za-z]+)"', source))
        if "Warning" in kinds:
            found.update(re.findall(r'_warn\(\s*\w+,\s*"([A-Z][A-Za-z]+)"', source))
    return found


def agent_status_reasons() -> set[str]:
    """Reasons the agent writes to `.status` as literals, plus those its errors carry."""
    found: set[str] = set()
    for source in agent_sources().values():
        if not any(marker in source for marker in ("StatusView(", "._fail(", "outcomes.failed(")):
            continue  # writes no status (kube.py's API errors have reasons for logs only)
        found.update(re.findall(r'\breason\s*=\s*"([A-Z][A-Za-z]+)"', source))
        found.update(
            re.findall(
                r'\b(?:_fail|_pending|views\.pending|views\.failed|_?outcomes\.failed)\(\s*"([A-Z][A-Za-z]+)"',
                source,
            )
        )
        # views.py: `reason, message = "Paused", ...` and `phase, reason = st.RUNNING, "Streaming"`
        found.update(re.findall(r'\breason,\s*message\s*=\s*"([A-Z][A-Za-z]+)"', source))
        found.update(re.findall(r'\bphase,\s*reason\s*=\s*[\w.]+,\s*"([A-Z][A-Za-z]+)"', source))
    views = agent_sources()["views.py"]
    # Reasons views.py names as constants (e.g. `QUEUED = "Queued"`).
    found.update(re.findall(r'^[A-Z_]+ = "([A-Z][A-Za-z]+)"$', views, re.MULTILINE))
    assert 'f"PausedOnError{job.io_status.capitalize()}"' in views, "update IO_STATUSES_ON_ERROR"
    found.update(f"PausedOnError{status.capitalize()}" for status in IO_STATUSES_ON_ERROR)
    return found | (error_reasons() - NOT_A_STATUS_REASON.keys())


# --- the environment-variable table -----------------------------------------------------------


def env_table() -> dict[str, str]:
    rows = table_rows(section(read(DOCS / "install.md"), "Agent configuration"))
    table = {}
    for row in rows:
        (name,) = code_spans(row[0])
        table[name] = row[1]
    return table


def test_the_environment_table_lists_exactly_what_the_agent_reads() -> None:
    assert set(env_table()) == variables_the_agent_reads()


def test_documented_defaults_are_the_agent_defaults() -> None:
    base = {"NODE_NAME": "node-a"}
    unset = AgentSettings.from_env(base)
    checked = 0
    for name, default in env_table().items():
        literal = code_spans(default)
        if name == "NODE_NAME":
            assert default == "(required)"
            with pytest.raises(InvalidSpec):
                AgentSettings.from_env({})
        elif literal:
            assert default == f"`{literal[0]}`", f"{name}: one literal default, got {default!r}"
            assert AgentSettings.from_env({**base, name: literal[0]}) == unset, f"{name}={literal[0]}"
            checked += 1
        else:
            # A description, e.g. "(all namespaces)": the variable has no value by default.
            assert default.startswith("(") and default.endswith(")"), f"{name}: {default!r}"
    assert checked >= 5


def test_the_socket_template_default_is_the_code_default() -> None:
    assert env_table()["BLOCKPULL_SOCKET_TEMPLATE"] == f"`{agent_settings.DEFAULT_SOCKET_TEMPLATE}`"


def test_every_variable_the_daemonset_sets_is_documented() -> None:
    daemonset = yaml.safe_load(read(REPO / "deploy" / "daemonset.yaml"))
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert {env["name"] for env in container["env"]} <= set(env_table())


# --- the CLI's tables -----------------------------------------------------------------------


def test_the_exit_status_table_is_the_cli_constants() -> None:
    rows = table_rows(section(read(DOCS / "cli.md"), "Exit status"))
    documented = [row[0] for row in rows]
    constants = {name: value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    expected = {str(value) for name, value in constants.items() if name != "EXIT_SIGNAL_BASE"}
    expected.add(f"{constants['EXIT_SIGNAL_BASE']}+N")
    assert len(documented) == len(set(documented))
    assert set(documented) == expected


def test_the_error_reason_table_is_what_the_cli_exits_with() -> None:
    statuses: dict[str, set[int]] = {}
    for cls in error_classes():
        statuses.setdefault(cls.reason, set()).add(cli.exit_status_for(cls("x")))
    assert all(len(found) == 1 for found in statuses.values()), statuses
    expected = {reason: found.pop() for reason, found in statuses.items()}
    rows = table_rows(section(read(DOCS / "cli.md"), "Error reasons"))
    documented = {code_spans(row[0])[0]: int(row[1]) for row in rows}
    assert documented == expected


# --- reasons and Events -----------------------------------------------------------------------


def documented_reasons(title: str) -> list[str]:
    rows = table_rows(section(read(DOCS / "api.md"), title))
    return [reason for row in rows for reason in code_spans(row[1])]


def test_the_reasons_table_covers_every_reason_the_agent_writes() -> None:
    assert set(documented_reasons("Conditions and reasons")) == agent_status_reasons()


def test_the_events_table_covers_every_event_the_agent_posts() -> None:
    documented = set(documented_reasons("Events"))
    assert documented == agent_event_reasons()


def test_the_ended_condition_reason_is_documented() -> None:
    status_source = agent_sources()["status.py"]
    for reason in re.findall(r'"(JobEnded)"', status_source):
        assert f"`{reason}`" in read(DOCS / "api.md")


def test_troubleshooting_has_a_section_per_reason() -> None:
    titles = " ".join(title for _, title in headings(read(DOCS / "troubleshooting.md")))
    in_titles = set(re.findall(r"`([A-Za-z]+)`", titles))
    # `Failed` is the Event of every failure: its reasons have their own sections.
    warnings = agent_event_reasons(("Warning",)) - {"Failed"}
    missing = (agent_status_reasons() | warnings) - in_titles
    assert not missing


# --- links, size and scope --------------------------------------------------------------------


def links(path: Path) -> list[str]:
    text = re.sub(r"`[^`]*`", "", without_code_blocks(read(path)))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
            continue
        relative = resolved.relative_to(REPO).as_posix()
        if not resolved.exists():
            if relative not in PAGES_FROM_OTHER_BRANCHES:
                broken.append(f"{target}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {relative}")
    assert not broken


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = read(README)
    assert len(text.splitlines()) <= 160
    first_block = re.search(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block[1].splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_every_docs_page_is_linked_from_the_index() -> None:
    linked = {target.partition("#")[0] for target in links(DOCS / "index.md")}
    pages = {path.name for path in DOCS.glob("*.md")} - {"index.md"}
    assert pages <= linked


def test_nothing_refers_to_files_outside_the_repository() -> None:
    # Spelled in pieces so that this file does not match itself.
    outside = ("/work/" + "shared", ".." + "/shared")
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    mentions: list[str] = []
    for name in filter(None, files):
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        mentions.extend(f"{name}: {word}" for word in outside if word in text)
    assert not mentions
