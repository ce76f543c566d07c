"""BLOCKPULL_LIBVIRT_URI and BLOCKPULL_DOMAIN_TEMPLATE: what the agent accepts at start, and
the names they give (pure)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from blockpull.agent.settings import AgentSettings
from blockpull.errors import InvalidSpec
from blockpull.libvirt.templates import DomainTemplate, URITemplate

BASE = {"NODE_NAME": "worker-3"}


def test_unset_means_qmp() -> None:
    settings = AgentSettings.from_env(BASE)
    assert settings.libvirt_uri is None
    assert settings.domain_template.template == "{namespace}_{vm}"


def test_one_uri_for_all_vms() -> None:
    settings = AgentSettings.from_env({**BASE, "BLOCKPULL_LIBVIRT_URI": "qemu:///system"})
    assert settings.libvirt_uri is not None
    assert settings.libvirt_uri.uri_for("vms", "web-1") == "qemu:///system"
    assert settings.domain_template.domain_for("vms", "web-1") == "vms_web-1"


def test_per_vm_daemon_uri() -> None:
    uri = URITemplate("qemu+unix:///session?socket=/run/blockpull/{namespace}/{vm}/virtqemud-sock")
    assert uri.per_vm and uri.fixed_directory == "/run/blockpull/"
    assert (
        uri.uri_for("vms", "web-1") == "qemu+unix:///session?socket=/run/blockpull/vms/web-1/virtqemud-sock"
    )


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("qemu+unix:///system?socket=/run/x/{namespace}/../../etc/{vm}", "'..'"),
        ("qemu+unix:///system?socket=run/{namespace}/{vm}", "absolute"),
        ("qemu+unix:///system?socket={namespace}/{vm}", "absolute"),
        ("qemu+unix:///system?socket=/{namespace}/{vm}", "fixed directory"),
        ("qemu+{vm}:///system", "scheme"),
        ("qemu:///{vm}", "only in its socket"),
        ("qemu:///system?socket=/run/x/sock&name={vm}", "only in its socket"),
        ("qemu+unix:///system?socket=/run/x/{vm}", "both"),
        ("qemu+unix:///system?socket=/run/x/{namespace}/{host}", "only"),
        ("qemu+unix:///system?socket=/run/x/{namespace/{vm}", "brace"),
        ("/run/libvirt/libvirt-sock", "scheme"),
    ],
)
def test_uri_templates_that_escape_are_refused(uri: str, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match):
        AgentSettings.from_env({**BASE, "BLOCKPULL_LIBVIRT_URI": uri})


@pytest.mark.parametrize(("namespace", "vm"), [("..", "x"), ("vms", "a/b"), ("vms", "A"), ("vms", "x&y")])
def test_names_are_labels(namespace: str, vm: str) -> None:
    uri = URITemplate("qemu+unix:///system?socket=/run/blockpull/{namespace}/{vm}/sock")
    with pytest.raises(InvalidSpec, match="DNS-1123"):
        uri.uri_for(namespace, vm)
    with pytest.raises(InvalidSpec, match="DNS-1123"):
        DomainTemplate().domain_for(namespace, vm)


def test_domain_template_without_namespace_needs_one_watched_namespace() -> None:
    env = {**BASE, "BLOCKPULL_LIBVIRT_URI": "qemu:///system", "BLOCKPULL_DOMAIN_TEMPLATE": "{vm}"}
    with pytest.raises(InvalidSpec, match="BLOCKPULL_WATCH_NAMESPACE"):
        AgentSettings.from_env(env)
    settings = AgentSettings.from_env({**env, "BLOCKPULL_WATCH_NAMESPACE": "vms"})
    assert settings.domain_template.domain_for("vms", "web-1") == "web-1"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{namespace}", "must contain"),
        ("{namespace}_{vm}_{uid}", "only"),
        ("a/{vm}", "'/'"),
        ("{vm", "brace"),
    ],
)
def test_bad_domain_templates(template: str, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match):
        AgentSettings.from_env(
            {**BASE, "BLOCKPULL_LIBVIRT_URI": "qemu:///system", "BLOCKPULL_DOMAIN_TEMPLATE": template}
        )


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"BLOCKPULL_DOMAIN_TEMPLATE": "{vm}"}, "BLOCKPULL_WATCH_NAMESPACE"),
        ({"BLOCKPULL_LIBVIRT_URI": "qemu+unix:///system?socket=/run/x/{namespace}/../{vm}"}, "'..'"),
    ],
)
def test_the_agent_refuses_to_start(extra: dict[str, str], words: str) -> None:
    """The agent process itself: one line, exit 2, before it talks to anything."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "NODE_NAME": "worker-3",
        "BLOCKPULL_LIBVIRT_URI": "qemu:///system",
        **extra,
    }
    done = subprocess.run(
        [sys.executable, "-m", "blockpull.agent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], lines
