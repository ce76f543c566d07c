"""The kopf edge: the per-node field selector must reach the BlockPull watch, and the error
tree maps onto kopf's temporary and permanent errors in one place."""

from __future__ import annotations

import kopf
import pytest
from kopf._cogs.structs import references

from blockpull.agent.handlers import FINALIZER, RETRY_DELAY, configure, kopf_error
from blockpull.agent.kube import KubeAPIError
from blockpull.agent.settings import AgentSettings
from blockpull.errors import (
    BlockPullError,
    CommandFailed,
    DiskBusy,
    InvalidSpec,
    QEMUUnavailable,
    VMExited,
)


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


@pytest.mark.parametrize(
    ("error", "kind", "retried"),
    [
        (QEMUUnavailable("QEMU does not answer"), kopf.TemporaryError, True),
        (DiskBusy("busy"), kopf.TemporaryError, True),
        (KubeAPIError("API away"), kopf.TemporaryError, True),
        (InvalidSpec("bad"), kopf.PermanentError, False),
        (VMExited("gone"), kopf.PermanentError, False),
        (CommandFailed("refused"), kopf.PermanentError, False),
    ],
)
def test_the_error_tree_maps_onto_kopf_at_the_edge(error: BlockPullError, kind: type, retried: bool) -> None:
    mapped = kopf_error(error)
    assert type(mapped) is kind and str(mapped) == error.message
    if retried:
        assert isinstance(mapped, kopf.TemporaryError) and mapped.delay == RETRY_DELAY
