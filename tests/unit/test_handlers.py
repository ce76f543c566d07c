"""The kopf edge's settings: the per-node field selector must reach the BlockPull watch."""

from __future__ import annotations

import kopf
from kopf._cogs.structs import references

from blockpull.agent.handlers import FINALIZER, configure
from blockpull.agent.settings import AgentSettings


def _blockpulls() -> references.Resource:
    return references.Resource(
        group="blockpull.dev",
        version="v1alpha1",
        plural="blockpulls",
        kind="BlockPull",
        namespaced=True,
        verbs=frozenset({"list", "watch", "patch"}),
    )


def test_the_node_field_selector_applies_to_blockpulls_only() -> None:
    settings = kopf.OperatorSettings()
    configure(settings, AgentSettings.from_env({"NODE_NAME": "worker-3"}))
    assert settings.watching.field_selectors.collect(_blockpulls()) == ["spec.nodeName=worker-3"]
    events = references.Resource(group="", version="v1", plural="events", namespaced=True)
    assert settings.watching.field_selectors.collect(events) == []
    assert settings.peering.standalone is True
    assert settings.persistence.finalizer == FINALIZER
