"""Bad input is refused with a clear message and changes nothing: by the API server's schema
where it can tell, by the agent (a reason in the status) where only the node can tell, and by
the agent's start-up where the node is misconfigured."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
from harness import (
    AgentFactory,
    AgentProcess,
    Namespace,
    VMFactory,
    assert_intact,
    assert_no_jobs,
    chatty_socket,
    run_process,
    silent_socket,
    socket_path,
)

from qemulab import Chain

REFUSED = [
    ({"vm": "Web_1"}, "spec.vm"),
    ({"vm": "../../etc"}, "spec.vm"),
    ({"vm": "a" * 64}, "spec.vm"),
    ({"nodeName": "Node A"}, "spec.nodeName"),
    ({"bandwidth": "lots"}, "spec.bandwidth"),
    ({"bandwidth": "-5Mi"}, "spec.bandwidth"),
    ({"bandwidth": -1}, "spec.bandwidth"),
    ({"onError": "explode"}, "spec.onError"),
    ({"activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds"),
    ({"ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished"),
    ({"paused": "yes"}, "spec.paused"),
    ({"disk": ""}, "spec.disk"),
    ({"disk": "/images/../etc/shadow"}, "spec.disk"),
    ({"base": "relative/path.qcow2"}, "spec.base"),
]


@pytest.mark.parametrize(("override", "field"), REFUSED, ids=[f"{f}={o}" for o, f in REFUSED])
def test_the_schema_refuses_bad_specs_with_the_field_named(
    ns: Namespace, override: dict[str, object], field: str
) -> None:
    spec = {"nodeName": "node-a", "vm": "web-1", "disk": "vda", **override}
    result = ns.apply(ns.manifest("bad", **spec), check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr
    assert ns.get("bad") is None


def test_missing_required_fields_are_refused(ns: Namespace) -> None:
    result = ns.apply(ns.manifest("bad", nodeName="node-a"), check=False)
    assert result.returncode != 0
    assert "spec.vm" in result.stderr and "spec.disk" in result.stderr, result.stderr


def test_a_socket_that_is_not_qemu_keeps_it_pending_then_the_deadline_fails_it(
    ns: Namespace, agent: AgentProcess, sockets: Path
) -> None:
    with chatty_socket(socket_path(sockets, ns.name, "imposter"), b"SSH-2.0-OpenSSH_9.2\r\n"):
        ns.create("imposter", nodeName="node-a", vm="imposter", disk="vda", activeDeadlineSeconds=4)
        pending = ns.wait_reason("imposter", "Pending", "QEMUUnavailable")
        assert pending["message"], pending
        failed = ns.wait_phase("imposter", "Completed", "Failed", timeout=20)
    assert (failed["phase"], failed["reason"]) == ("Failed", "DeadlineExceeded"), failed


def test_a_silent_socket_keeps_it_pending_without_harm(
    ns: Namespace, agent: AgentProcess, sockets: Path
) -> None:
    with silent_socket(socket_path(sockets, ns.name, "mute")):
        ns.create("mute", nodeName="node-a", vm="mute", disk="vda")
        status = ns.wait_reason("mute", "Pending", "QEMUUnavailable")
        assert "jobId" not in status
    assert agent.alive


def test_bad_disk_or_base_changes_nothing_on_any_disk(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [chain4])
    ns.create("d1", nodeName="node-a", vm="web-1", disk="/no/such/disk.qcow2")
    ns.create("d2", nodeName="node-a", vm="web-1", disk=str(chain4.images[1]))  # a backing image
    ns.create("d3", nodeName="node-a", vm="web-1", disk=str(chain4.top), base="no-such-node")
    expected = {"d1": "DiskNotFound", "d2": "DiskNotFound", "d3": "BaseNotInChain"}
    for name, reason in expected.items():
        status = ns.wait_phase(name, "Completed", "Failed")
        assert (status["phase"], status["reason"]) == ("Failed", reason), status
    assert "backing image" in ns.status("d2")["message"]
    assert_no_jobs(vm)
    assert vm.alive
    vm.stop_sync()
    assert_intact(chain4)


@pytest.mark.parametrize(
    ("template", "complaint"),
    [
        ("relative/{namespace}/{vm}.qmp", "absolute"),
        ("/run/blockpull/../{namespace}/{vm}.qmp", ".."),
        ("/run/blockpull/{namespace}/{vm}/../../x.qmp", ".."),
        ("/run/blockpull/{vm}.qmp", "{namespace}"),
        ("/run/blockpull/{namespace}/{vm}/{node}.qmp", "{node}"),
        ("/{namespace}/{vm}.qmp", "directory"),
        ("/run/" + "x" * 90 + "/{namespace}/{vm}.qmp", "107"),
    ],
)
def test_agent_refuses_to_start_with_a_template_that_could_escape(
    template: str, complaint: str, tmp_path: Path
) -> None:
    env = {**os.environ, "NODE_NAME": "node-a", "BLOCKPULL_SOCKET_TEMPLATE": template}
    env.pop("KUBECONFIG", None)
    result = run_process([sys.executable, "-m", "blockpull.agent"], env=env)
    assert result.returncode == 2, result
    line = result.stderr.strip()
    assert line.startswith("blockpull-agent: error: ") and "\n" not in line, line
    assert complaint in line, line


def test_agent_refuses_to_start_without_a_node_name() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    result = run_process([sys.executable, "-m", "blockpull.agent"], env=env)
    assert result.returncode == 2
    assert "NODE_NAME" in result.stderr


def test_a_stale_socket_is_said_once_in_the_log_not_every_retry(
    ns: Namespace, agent_factory: AgentFactory, sockets: Path
) -> None:
    """QEMU gone, its socket file left behind (connection refused): the object waits Pending and
    the agent's log says so once, naming the object and the socket, not on every retry."""
    agent = agent_factory(BLOCKPULL_PENDING_BACKOFF_MAX="0.2", BLOCKPULL_LOG_LEVEL="INFO")
    path = socket_path(sockets, ns.name, "gone")
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens
    ns.create("stale", nodeName="node-a", vm="gone", disk="vda")
    status = ns.wait_reason("stale", "Pending", "QEMUUnavailable")
    assert str(path) in status["message"], status
    time.sleep(3)  # about fifteen retries at this backoff
    log = agent.log()
    mentions = [line for line in log.splitlines() if str(path) in line]
    assert len(mentions) == 1 and f"{ns.name}/stale" in mentions[0], mentions
    assert " ERROR " not in log, log[-3000:]
    assert "qemu.qmp" not in log
