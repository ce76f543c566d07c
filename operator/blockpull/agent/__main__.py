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

from blockpull.agent.settings import AgentSettings
from blockpull.errors import InvalidSpec


def main() -> None:
    # Settings first and without heavy imports, so a misconfigured DaemonSet says why at once.
    try:
        settings = AgentSettings.from_env()
    except InvalidSpec as exc:
        print(f"blockpull-agent: error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=os.environ.get("BLOCKPULL_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(settings))


async def _run(settings: AgentSettings) -> None:
    import kopf  # noqa: PLC0415
    import kubernetes  # noqa: PLC0415

    from blockpull.agent.handlers import build_registry  # noqa: PLC0415
    from blockpull.agent.kube import KubeAPI  # noqa: PLC0415
    from blockpull.agent.manager import Agent  # noqa: PLC0415
    from blockpull.agent.vms import VMConnections  # noqa: PLC0415

    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        api_client = kubernetes.client.ApiClient()
    else:
        # Pass the path explicitly: kubernetes.config reads $KUBECONFIG at import time.
        api_client = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG")
        )
    kube = KubeAPI(api_client, component="blockpull-agent", node_name=settings.node_name)
    vms = VMConnections(connect_timeout=settings.connect_timeout, command_timeout=settings.command_timeout)
    agent = Agent(settings, kube, vms)
    registry = build_registry(lambda: agent, settings)
    liveness = f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    await kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=settings.watch_namespace is None,
        namespaces=[settings.watch_namespace] if settings.watch_namespace else [],
        liveness_endpoint=liveness,
    )


if __name__ == "__main__":
    main()
