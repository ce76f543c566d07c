"""The manager's bookkeeping: a finished object is never started again by a stale event."""

from __future__ import annotations

from typing import Any

from blockpull.agent.manager import Agent
from blockpull.agent.settings import AgentSettings
from blockpull.agent.vms import VMConnections


def _body(uid: str, status: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "vms", "uid": uid, "generation": 1},
        "spec": {"nodeName": "worker-3", "vm": "web-1", "disk": "vda"},
        "status": status,
    }


async def test_a_stale_unfinished_body_of_a_finished_object_starts_nothing() -> None:
    settings = AgentSettings.from_env({"NODE_NAME": "worker-3", "BLOCKPULL_LIVENESS_PORT": "0"})
    vms = VMConnections(settings.socket_template, connect_timeout=1, command_timeout=1)
    agent = Agent(settings, kube=None, vms=vms)  # type: ignore[arg-type]
    agent._finished.add("u1")
    # kopf delivers an event queued before the outcome was written: Running, or no status yet.
    agent.observe(_body("u1", {"phase": "Running", "conditions": []}))
    agent.observe(_body("u1", None))
    assert agent.active == 0
    # Once the object is deleted and forgotten, the uid means nothing any more.
    agent.forget("u1")
    assert "u1" not in agent._finished
