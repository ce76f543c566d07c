"""The socket template and the agent's environment: every way out of the directory is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from blockpull.agent.settings import AgentSettings, SocketTemplate
from blockpull.errors import InvalidSpec


def test_default_template_substitutes_namespace_and_vm() -> None:
    template = SocketTemplate("/run/blockpull/{namespace}/{vm}.qmp")
    assert template.fixed_directory == "/run/blockpull/"
    assert template.path_for("vms", "web-1") == "/run/blockpull/vms/web-1.qmp"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("run/{namespace}/{vm}.qmp", "absolute"),
        ("/run/{vm}.qmp", "{namespace} and {vm}"),
        ("/run/{namespace}/{vm}/{node}.qmp", "no other placeholder"),
        ("/run/{namespace}/../{vm}.qmp", "'..'"),
        ("/{namespace}/{vm}.qmp", "fixed directory"),
        ("/run/" + "x" * 90 + "/{namespace}/{vm}.qmp", "allow 107 bytes"),
        ("/run/{namespace}/{vm}.qmp{", "placeholder"),
    ],
)
def test_bad_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(
        InvalidSpec, match=message.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")
    ):
        SocketTemplate(template)


@pytest.mark.parametrize(
    ("namespace", "vm"),
    [
        ("vms", "../etc"),
        ("vms", "a/b"),
        ("..", "web"),
        ("vms", "Web"),
        ("vms", ""),
        ("vms", "-web"),
        ("vms", "web."),
        ("vms", "x" * 64),
        ("vms", "web\x00"),
    ],
)
def test_names_that_are_not_dns_labels_never_reach_the_filesystem(namespace: str, vm: str) -> None:
    with pytest.raises(InvalidSpec, match="DNS-1123 label"):
        SocketTemplate("/run/blockpull/{namespace}/{vm}.qmp").path_for(namespace, vm)


def test_names_too_long_for_a_unix_socket_are_refused_per_object() -> None:
    template = SocketTemplate("/run/blockpull/{namespace}/{vm}.qmp")
    assert len(template.path_for("n" * 40, "v" * 47).encode()) == 107
    with pytest.raises(InvalidSpec, match=r"is 1\d\d bytes long; unix socket paths allow at most 107"):
        template.path_for("n" * 63, "v" * 63)


def test_settings_from_env_fail_fast() -> None:
    with pytest.raises(InvalidSpec, match="NODE_NAME is required"):
        AgentSettings.from_env({})
    with pytest.raises(InvalidSpec, match="not a valid node name"):
        AgentSettings.from_env({"NODE_NAME": "Worker_3"})
    with pytest.raises(InvalidSpec, match="BLOCKPULL_STATUS_INTERVAL"):
        AgentSettings.from_env({"NODE_NAME": "w", "BLOCKPULL_STATUS_INTERVAL": "soon"})
    with pytest.raises(InvalidSpec, match="BLOCKPULL_WATCH_NAMESPACE"):
        AgentSettings.from_env({"NODE_NAME": "w", "BLOCKPULL_WATCH_NAMESPACE": "A B"})
    settings = AgentSettings.from_env(
        {"NODE_NAME": "worker-3", "BLOCKPULL_STATUS_INTERVAL": "0.5", "BLOCKPULL_LIVENESS_PORT": "0"}
    )
    assert settings.node_name == "worker-3"
    assert settings.status_interval == 0.5
    assert settings.liveness_port is None
    assert settings.socket_template.template == "/run/blockpull/{namespace}/{vm}.qmp"
    assert (settings.max_concurrent, settings.node_bandwidth) == (4, 0)


def test_node_scheduling_settings() -> None:
    settings = AgentSettings.from_env(
        {"NODE_NAME": "n", "BLOCKPULL_MAX_CONCURRENT": "0", "BLOCKPULL_NODE_BANDWIDTH": "200Mi"}
    )
    assert (settings.max_concurrent, settings.node_bandwidth) == (0, 200 << 20)
    assert (
        AgentSettings.from_env({"NODE_NAME": "n", "BLOCKPULL_NODE_BANDWIDTH": "1048576"}).node_bandwidth
        == 1 << 20
    )
    assert AgentSettings.from_env({"NODE_NAME": "n", "BLOCKPULL_NODE_BANDWIDTH": "0"}).node_bandwidth == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BLOCKPULL_LOG_LEVEL", "LOUD"),
        ("BLOCKPULL_POLL_INTERVAL", "inf"),
        ("BLOCKPULL_STATUS_INTERVAL", "nan"),
        ("BLOCKPULL_DELETE_TIMEOUT", "-1"),
        ("BLOCKPULL_MAX_CONCURRENT", "-1"),
        ("BLOCKPULL_MAX_CONCURRENT", "two"),
        ("BLOCKPULL_NODE_BANDWIDTH", "fast"),
        ("BLOCKPULL_NODE_BANDWIDTH", "-8Mi"),
    ],
)
def test_bad_values_are_refused_at_start(name: str, value: str) -> None:
    with pytest.raises(InvalidSpec, match=name):
        AgentSettings.from_env({"NODE_NAME": "node-a", name: value})


@pytest.mark.parametrize(
    "env",
    [
        {"BLOCKPULL_LOG_LEVEL": "LOUD"},
        {"KUBECONFIG": "/nonexistent/kubeconfig"},
        {"BLOCKPULL_POLL_INTERVAL": "inf"},
        {"BLOCKPULL_NODE_BANDWIDTH": "lots"},
    ],
)
def test_the_agent_says_what_is_wrong_in_one_line_and_exits_2(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blockpull.agent"],
        env={"PATH": os.environ["PATH"], "NODE_NAME": "node-a", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, result
    assert len(lines) == 1 and lines[0].startswith("blockpull-agent: error: "), lines
