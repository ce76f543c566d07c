"""The image's install and start steps work, proven without a Docker engine.

The Dockerfile's builder stage builds the project's wheel from the build context alone, installs
it (no extras) into a pip-less venv, and the runtime stage starts `blockpull-agent` as UID 10001
on a read-only root filesystem. These tests do the same steps on this machine: the build context
is what .dockerignore lets in, the commands are the Dockerfile's, and the agent runs, where
the machine allows it, in a private mount namespace with `/` read-only, a tmpfs at /tmp and
UID/GID 10001 (the DaemonSet's securityContext). Dependencies come from PyPI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import REPO, build_context_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

UID = GID = 10001
LIST_DISTRIBUTIONS = """
import importlib.metadata as m, json
print(json.dumps({d.metadata["Name"]: d.requires or [] for d in m.distributions()}))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return canonical(match[1])


def run(command: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Not under /tmp: the sandbox below mounts an empty tmpfs there, as the DaemonSet does.
    base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="blockpull-image-", dir=base))
    path.chmod(0o755)  # readable by UID 10001
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def venv(workdir: Path) -> Path:
    """The Dockerfile's builder stage: wheel from the build context, venv without pip."""
    context = workdir / "context"
    for relative in build_context_files():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, context / relative)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    readme = project.get("readme")
    named = [readme] if isinstance(readme, str) else []
    for path in [*named, *project.get("license-files", [])]:
        assert (context / path).exists(), f"pyproject.toml names {path}, which the image's context lacks"
    dist, venv = workdir / "dist", workdir / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--wheel-dir", str(dist), str(context)], timeout=600)
    (wheel,) = dist.glob("blockpull-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    run([*pip, "--python", str(venv / "bin" / "python"), "install", str(wheel)], timeout=900)
    return venv


def test_venv_holds_exactly_the_runtime_dependencies(venv: Path) -> None:
    listing = run([str(venv / "bin" / "python"), "-c", LIST_DISTRIBUTIONS], timeout=60)
    installed = {canonical(name): reqs for name, reqs in json.loads(listing.stdout).items()}
    # Walk blockpull's requirements, leaving out those that only an extra asks for.
    closure, todo = set(), ["blockpull"]
    while todo:
        name = todo.pop()
        if name in closure or name not in installed:
            continue
        closure.add(name)
        todo += [requirement_name(r) for r in installed[name] if "extra ==" not in r]
    assert set(installed) == closure, "installed but not needed at run time"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dev_only = {requirement_name(r) for r in project["optional-dependencies"]["dev"]} - closure
    assert {"pytest", "mypy", "ruff", "types-jsonschema"} <= dev_only
    assert not dev_only & set(installed)
    assert "pip" not in installed, "the runtime venv has no installer"


def test_wheel_holds_only_the_product(workdir: Path, venv: Path) -> None:
    """The contract's "Packaging": the `blockpull` package and its console scripts, nothing else
    (the QEMU lab and the API stand-in are test-only code in tests/support)."""
    (wheel,) = (workdir / "dist").glob("blockpull-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"blockpull"}, top_level
    declared = set(re.findall(r"^([\w-]+) = ", scripts, re.MULTILINE))
    expected = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    assert declared == expected and {"blockpull", "blockpull-agent"} <= declared, declared


def image_env(venv: Path) -> dict[str, str]:
    """The image's environment (Dockerfile ENV), without NODE_NAME and without any kubeconfig."""
    return {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def sandbox(venv: Path) -> tuple[list[str], str]:
    """A command prefix that runs like the image, as closely as this machine allows; and how.

    Best: a private mount namespace with / read-only and an empty tmpfs at /tmp, as UID/GID
    10001 with no capabilities. Each weaker way is used only if the stronger one cannot even
    start the venv's Python here (no root, no unshare, an interpreter that UID 10001 cannot
    read...), so that the test says what this machine lacks instead of failing on it.
    """
    candidates: list[tuple[list[str], str]] = []
    setpriv_path, unshare_path = shutil.which("setpriv"), shutil.which("unshare")
    if os.geteuid() == 0 and setpriv_path:
        setpriv = [setpriv_path, f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--no-new-privs"]
        if unshare_path:
            script = (
                "mount -o remount,bind,ro / && mount -t tmpfs -o mode=1777,size=16m tmpfs /tmp"
                ' && cd / && exec "$@"'
            )
            unshare = [unshare_path, "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
            candidates.append(([*unshare, *setpriv], f"as {UID}:{GID}, / read-only"))
        candidates.append((setpriv, f"as {UID}:{GID}"))
    candidates.append(([], "as the current user"))
    probe = [str(venv / "bin" / "python"), "-c", "import blockpull"]
    for prefix, how in candidates:
        result = subprocess.run(
            [*prefix, *probe],
            capture_output=True,
            env=image_env(venv),
            cwd="/",
            timeout=120,
            check=False,
        )
        if result.returncode == 0:
            return prefix, how
    pytest.fail("the venv's Python cannot even import blockpull")


@pytest.mark.parametrize("entry", ["console script", "python -m"])
def test_agent_starts_and_fails_fast_without_node_name(
    venv: Path, sandbox: tuple[list[str], str], entry: str
) -> None:
    bin_dir = venv / "bin"
    command = (
        [str(bin_dir / "blockpull-agent")]
        if entry == "console script"
        else [str(bin_dir / "python"), "-m", "blockpull.agent"]
    )
    prefix, how = sandbox
    result = subprocess.run(
        [*prefix, *command],
        capture_output=True,
        text=True,
        timeout=60,
        env=image_env(venv),
        cwd="/",
        check=False,
    )
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.returncode not in (0, None) and result.returncode > 0, (how, output)
    assert "Traceback" not in output, (how, output)
    assert len(lines) == 1, f"expected one line of error ({how}):\n{output}"
    assert "NODE_NAME" in lines[0], (how, output)
