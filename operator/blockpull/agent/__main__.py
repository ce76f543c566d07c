"""`blockpull-agent` / `python -m blockpull.agent`: the node agent's entry point.

Owns: reading settings (failing fast with one line), building the Kubernetes client from
`KUBECONFIG` or the in-cluster service account, and running kopf standalone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

from blockpull.agent.settings import AgentSettings
from blockpull.errors import InvalidSpec

if TYPE_CHECKING:  # imported for real only once settings are known good (see main)
    import kopf
    import kubernetes


def main() -> None:
    # Settings first and without heavy imports, so a misconfigured DaemonSet says why at once.
    try:
        settings = AgentSettings.from_env()
    except InvalidSpec as exc:
        print(f"blockpull-agent: error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # qemu.qmp logs every QMP message at DEBUG; that is a protocol trace, not an agent log.
    logging.getLogger("qemu.qmp").setLevel(max(logging.INFO, logging.getLogger().level))
    # kopf logs "Handler ... succeeded" at INFO for every watch event, i.e. for every status
    # write of every object: noise at scale. Its warnings and errors still show.
    if logging.getLogger().level >= logging.INFO:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run(settings))
    except InvalidSpec as exc:  # the Kubernetes client configuration: one line, as above
        print(f"blockpull-agent: error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


async def _run(settings: AgentSettings) -> None:
    import kopf  # noqa: PLC0415

    from blockpull.agent.handlers import build_registry  # noqa: PLC0415
    from blockpull.agent.kube import KubeAPI  # noqa: PLC0415
    from blockpull.agent.manager import Agent  # noqa: PLC0415
    from blockpull.agent.vms import VMConnections, VMs  # noqa: PLC0415

    api_client = _api_client()
    kube = KubeAPI(api_client, component="blockpull-agent", node_name=settings.node_name)
    vms: VMs
    if settings.libvirt_uri is not None:
        from blockpull.agent.libvirt_vms import LibvirtVMs  # noqa: PLC0415

        vms = LibvirtVMs(
            settings.libvirt_uri, settings.domain_template, call_timeout=settings.command_timeout
        )
    else:
        vms = VMConnections(
            settings.socket_template,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
        )
    agent = Agent(settings, kube, vms)
    registry = build_registry(lambda: agent, settings, lambda: connection_info(api_client))
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    await kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=settings.watch_namespace is None,
        namespaces=[settings.watch_namespace] if settings.watch_namespace else [],
        liveness_endpoint=liveness,
    )


def _api_client() -> kubernetes.client.ApiClient:
    """The official client, from the service account in a pod or from KUBECONFIG; a broken
    configuration is one clear line (InvalidSpec), not the client's traceback."""
    import kubernetes  # noqa: PLC0415

    kubeconfig = os.environ.get("KUBECONFIG")
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
            return kubernetes.client.ApiClient()
        # Pass the path explicitly: kubernetes.config reads $KUBECONFIG at import time.
        return kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call,no-any-return]
            config_file=kubeconfig
        )
    except Exception as exc:  # the client raises ConfigException, OSError, YAML errors...
        where = (
            f"KUBECONFIG={kubeconfig}" if kubeconfig else "the in-cluster service account or ~/.kube/config"
        )
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidSpec(f"cannot load the Kubernetes client configuration from {where}: {detail}") from exc


def connection_info(api_client: kubernetes.client.ApiClient) -> kopf.ConnectionInfo:
    """kopf's view of the official client's configuration (server, TLS, token or certificate)."""
    import kopf  # noqa: PLC0415

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


if __name__ == "__main__":
    main()
