"""The krew manifest template renders (as krew-release-bot does) to a manifest krew accepts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "krew" / "blockpull.krew.tmpl"
_ADD = re.compile(r'\{\{ addURIAndSha "(?P<uri>[^"]+)" \.TagName \}\}')


def render(tag: str, sha256: str) -> dict[str, Any]:
    """What the release bot does: the tag, then each archive's uri and checksum."""
    text = TEMPLATE.read_text()

    def add(match: re.Match[str]) -> str:
        uri = match["uri"].replace("{{ .TagName }}", tag)
        indent = " " * (len(text[: match.start()].rsplit("\n", 1)[-1]))
        return f"uri: {uri}\n{indent}sha256: {sha256}"

    text = _ADD.sub(add, text).replace("{{ .TagName }}", tag)
    assert "{{" not in text
    manifest: dict[str, Any] = yaml.safe_load(text)
    return manifest


def test_the_rendered_manifest_has_what_krew_requires() -> None:
    manifest = render("v0.1.0", "a" * 64)
    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert manifest["kind"] == "Plugin"
    assert manifest["metadata"]["name"] == "blockpull"
    spec = manifest["spec"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", spec["version"])
    assert spec["homepage"].startswith("https://")
    assert 0 < len(spec["shortDescription"]) <= 50  # krew's guideline for the index listing
    for key in ("description", "caveats"):
        assert spec[key].strip()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for platform in spec["platforms"]:
        assert platform["selector"]["matchExpressions"]
        assert platform["uri"] == (
            "https://github.com/blockpull/blockpull/releases/download/v0.1.0/kubectl-blockpull.tar.gz"
        )
        assert re.fullmatch(r"[0-9a-f]{64}", platform["sha256"])
        # The executable krew links as `kubectl-blockpull` is the package's console script.
        assert platform["bin"] == "kubectl-blockpull" and platform["bin"] in scripts
        assert {f["from"] for f in platform["files"]} >= {"kubectl-blockpull", "LICENSE"}


def test_the_template_is_not_a_cluster_manifest() -> None:
    # The manifest checks read every *.yaml under deploy/ as something a cluster receives.
    assert not list(TEMPLATE.parent.glob("*.yaml"))
