"""Helpers for the manifest tests: where the manifests are and how to load and render them.

Owns: loading every YAML document of crds/ and deploy/, and `kubectl kustomize`.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
CRD_FILE = CRDS / "blockpull.dev_blockpulls.yaml"
DEPLOY = REPO / "deploy"
SAMPLES = DEPLOY / "samples"

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    """Every non-empty YAML document of one file."""
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


#: Under deploy/ but not Kubernetes manifests: Argo CD's health check (a ConfigMap patch, its
#: test layout and recorded objects) and promtool's alert tests (tests/operator/test_gitops_argocd.py
#: and tests/unit/test_metrics_alerts.py check them).
NOT_MANIFESTS = (DEPLOY / "argocd", DEPLOY / "monitoring" / "tests")


def manifest_files() -> list[Path]:
    """Every YAML file of crds/ and deploy/ (samples and kustomizations included)."""
    return sorted(
        path
        for path in [*CRDS.rglob("*.yaml"), *DEPLOY.rglob("*.yaml")]
        if not any(path.is_relative_to(other) for other in NOT_MANIFESTS)
    )


def kubectl_kustomize(directory: Path) -> list[Doc]:
    """What `kubectl apply -k DIRECTORY` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: cannot render kustomizations")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def one(docs: list[Doc], kind: str) -> Doc:
    """The single document of KIND."""
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


# --- the Docker build context ----------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """One .dockerignore pattern, with Docker's meaning of `*`, `?` and `**`."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


class DockerIgnoreRule(NamedTuple):
    text: str
    exception: bool  # a `!pattern` line: lets matching paths back in
    regex: re.Pattern[str]


def dockerignore_rules() -> list[DockerIgnoreRule]:
    """Each pattern line of .dockerignore, in order."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            text = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
            rules.append(DockerIgnoreRule(text, line.startswith("!"), _dockerignore_regex(text)))
    return rules


def docker_ignores(relative: str, rules: list[DockerIgnoreRule]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for rule in rules:
        if any(rule.regex.match(candidate) for candidate in candidates):
            ignored = not rule.exception
    return ignored


def build_context_files() -> list[Path]:
    """The files `docker build .` sends (repository-relative), per .dockerignore."""
    rules = dockerignore_rules()
    assert docker_ignores(".git", rules), ".git must stay out of the build context"

    def may_hold_exceptions(directory: str) -> bool:
        return any(rule.exception and (rule.text.startswith((f"{directory}/", "*"))) for rule in rules)

    found = []
    for root, dirs, files in os.walk(REPO):
        here = Path(root).relative_to(REPO)
        # Skip directories that are ignored and that no `!` line can reach into (.git, caches).
        dirs[:] = sorted(
            name
            for name in dirs
            if not docker_ignores((here / name).as_posix(), rules)
            or may_hold_exceptions((here / name).as_posix())
        )
        found += [here / name for name in files if not docker_ignores((here / name).as_posix(), rules)]
    return sorted(found)
