"""`blockpull-agent` / `python -m blockpull.agent`: the node agent's entry point.

Owns: reading settings (failing fast with one line), serving the Prometheus metrics (a port
that cannot be bound fails the start the same way), building the Kubernetes client from
`KUBECONFIG` or the in-cluster service account, and running kopf standalone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from blockpull.agent.metrics import AgentMetrics
from blockpull.agent.settings import AgentSettings
from blockpull.errors import InvalidSpec


def main() -> None:
    # Settings first and without heavy imports, so a misconfigured DaemonSet says why at once.
    try:
        settings = AgentSettings.from_env()
    except InvalidSpec as exc:
        print(f"blockpull-agent: error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    metrics = start_metrics(settings)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # qemu.qmp logs every QMP message at DEBUG (a protocol trace, not an agent log), and each
    # failed connect as an ERROR naming neither object nor socket, every retry. The agent
    # reports those failures itself (the object's Pending reason, one log line per change),
    # so qemu.qmp speaks only at DEBUG.
    logging.getLogger("qemu.qmp").setLevel(
        logging.DEBUG if settings.log_level == "DEBUG" else logging.CRITICAL + 1
    )
    # kopf logs "Handler ... succeeded" at INFO for every watch event, i.e. for every status
    # write of every object: noise at scale. Its warnings and errors still show.
    if logging.getLogger().level >= logging.INFO:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run(settings, metrics))
    except InvalidSpec as exc:  # the Kubernetes client configuration: one line, as above
        print(f"blockpull-agent: error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


def start_metrics(settings: AgentSettings) -> AgentMetrics:
    """The agent's metrics, served before kopf starts: a taken port stops the agent at once."""
    metrics = AgentMetrics(settings.node_name)
    if settings.metrics_port is not None:
        try:
            metrics.serve(settings.metrics_port)
        except OSError as exc:
            print(
                f"blockpull-agent: error: BLOCKPULL_METRICS_PORT {settings.metrics_port}: cannot serve "
                f"metrics there ({exc.strerror or exc})",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
    return metrics


async def _run(settings: AgentSettings, metrics: AgentMetrics) -> None:
    import kopf  # noqa: PLC0415

    from blockpull.agent.handlers import build_registry, connection_info  # noqa: PLC0415
    from blockpull.agent.kube import KubeAPI, api_client_from_environment  # noqa: PLC0415
    from blockpull.agent.manager import Agent  # noqa: PLC0415
    from blockpull.agent.vms import VMConnections, VMs  # noqa: PLC0415

    api_client = api_client_from_environment()
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
    agent = Agent(settings, kube, vms, metrics=metrics)
    registry = build_registry(lambda: agent, settings, lambda: connection_info(api_client))
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
