"""The kopf edge: thin handlers that hand Kubernetes events to the `Agent`.

Owns: which objects this agent sees (only its node's, filtered by the API server), the kopf
settings that keep agents of different nodes out of each other's way, and mapping the error
tree onto kopf's temporary/permanent errors.

Choices that matter:
- `on.event` (not create/update/resume) feeds the agent: it writes no kopf annotations, so
  wiping them (`kubectl replace`) or re-applying a manifest changes nothing; the outcome lives
  in `.status`, which only the agent writes.
- `on.delete` only while the object is unfinished: kopf then adds its finalizer only to objects
  the agent may still have to act on, and removes it once the outcome is recorded, so deleting a
  finished BlockPull never waits for an agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import kopf

if TYPE_CHECKING:  # the client object is built by blockpull.agent.kube
    import kubernetes

from blockpull.agent import status as st
from blockpull.agent.kube import GROUP, PLURAL, VERSION
from blockpull.agent.manager import Agent
from blockpull.agent.settings import AgentSettings
from blockpull.errors import BlockPullError

FINALIZER = "blockpull.dev/agent"
RESOURCE = (GROUP, VERSION, PLURAL)


def configure(settings: kopf.OperatorSettings, agent_settings: AgentSettings) -> None:
    # One agent per node, never paused by peering with the others.
    settings.peering.standalone = True
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="blockpull.dev")
    # No "last handled configuration": the agent has no create/update handlers to diff for,
    # so storing one would only cost a write per object (and an annotation users wonder about).
    settings.persistence.diffbase_storage = NoDiffBase()
    # The API server sends this agent only its node's objects (CRD selectableFields), so
    # agents never see, let alone patch, each other's objects or finalizers.
    # The key is a kopf resource selector: (group, plural). ("group/plural" as one string
    # would be parsed as a name in the group "dev/blockpulls" and match nothing.)
    settings.watching.field_selectors[(GROUP, PLURAL)] = f"spec.nodeName={agent_settings.node_name}"
    settings.posting.level = logging.WARNING
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


class NoDiffBase(kopf.DiffBaseStorage):
    """Keeps nothing. kopf diffs objects only for on.create/update/resume, which the agent
    does not use: it reacts to the object's state (`on.event`), with the outcome in `.status`."""

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return not st.is_terminal(status)


#: How soon kopf retries a delete that hit a transient problem (QEMU busy, the API away).
RETRY_DELAY = 2


def kopf_error(exc: BlockPullError) -> kopf.TemporaryError | kopf.PermanentError:
    """The edge's one mapping of the error tree: waiting is a retry, the rest gives up."""
    if exc.retryable:
        return kopf.TemporaryError(exc.message, delay=RETRY_DELAY)
    return kopf.PermanentError(exc.message)


def build_registry(
    get_agent: Callable[[], Agent],
    agent_settings: AgentSettings,
    login: Callable[[], kopf.ConnectionInfo],
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def credentials(**_: Any) -> kopf.ConnectionInfo:
        # The same credentials as the agent's own client (KUBECONFIG or the service account);
        # kopf calls this again when the API answers 401 (a rotated service-account token).
        return login()

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, agent_settings)
        # Before kopf starts watching: the queue is rebuilt from the node's full list first.
        await get_agent().start()

    @kopf.on.event(*RESOURCE, registry=registry)
    async def observe(body: kopf.Body, type: str | None, **_: Any) -> None:
        # async: kopf runs sync handlers in threads, and the agent lives on the event loop.
        if type == "DELETED":
            get_agent().forget(str(body.get("metadata", {}).get("uid", "")))
            return
        get_agent().observe(body)

    @kopf.on.delete(*RESOURCE, registry=registry, when=_unfinished)
    async def abort(body: kopf.Body, **_: Any) -> None:
        try:
            await get_agent().delete(body)
        except BlockPullError as exc:
            raise kopf_error(exc) from exc

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await get_agent().shutdown()

    return registry


def connection_info(api_client: kubernetes.client.ApiClient) -> kopf.ConnectionInfo:
    """kopf's view of the official client's configuration (server, TLS, token or certificate)."""
    config = api_client.configuration
    # The client keeps the token under "BearerToken" (kubernetes >= 36) or "authorization";
    # reading it through get_api_key_with_prefix runs the in-cluster token refresh hook.
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    scheme, token = header.split(" ", 1) if header and " " in header else (None, header or None)
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )
