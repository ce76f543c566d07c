"""The node agent's configuration: read once from the environment, refused at start if wrong.

Owns: every knob the agent has, its default, and the check that makes a bad value fail fast
with one clear line instead of misbehaving later.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from blockpull.errors import InvalidSpec
from blockpull.libvirt.templates import DEFAULT_DOMAIN_TEMPLATE, DomainTemplate, URITemplate
from blockpull.quantity import parse_bandwidth

DEFAULT_SOCKET_TEMPLATE = "/run/blockpull/{namespace}/{vm}.qmp"
#: Jobs in QEMU at once per node: streams compete with the guests' own I/O for the node's
#: storage. KubeVirt allows 2 outbound migrations per node, Longhorn 5 replica rebuilds.
DEFAULT_MAX_CONCURRENT = 4
#: Beside kopf's liveness port (8080); 9090 is Prometheus's own and 9100 node-exporter's.
DEFAULT_METRICS_PORT = 8081
#: sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class SocketTemplate:
    """Where a VM's QMP socket lives: only `{namespace}` and `{vm}` are substituted.

    The directory before the first placeholder is fixed; no substitution may lead outside it.
    """

    template: str

    def __post_init__(self) -> None:
        names = _PLACEHOLDER.findall(self.template)
        if not os.path.isabs(self.template):
            raise InvalidSpec(f"socket template {self.template!r} must be an absolute path")
        if sorted(set(names)) != ["namespace", "vm"] or self.template.count("{") != len(names):
            raise InvalidSpec(
                f"socket template {self.template!r} must contain {{namespace}} and {{vm}} "
                "and no other placeholder"
            )
        if ".." in self.template.split("/"):
            raise InvalidSpec(f"socket template {self.template!r} must not contain '..'")
        if os.path.dirname(self.fixed_directory) == self.fixed_directory:
            raise InvalidSpec(f"socket template {self.template!r} must start with a fixed directory")
        # The fixed part must leave room for names (checked per object in `path_for` too:
        # 63+63-character names do not fit the default template's 107 bytes, and the error
        # then names the object instead of stopping the whole agent).
        shortest = self.template.replace("{namespace}", "n" * 8).replace("{vm}", "v" * 8)
        if len(shortest.encode()) > MAX_SOCKET_PATH_BYTES:
            raise InvalidSpec(
                f"socket template {self.template!r} leaves no room for names: unix socket paths "
                f"allow {MAX_SOCKET_PATH_BYTES} bytes"
            )

    @property
    def fixed_directory(self) -> str:
        prefix = self.template.split("{", 1)[0]
        return prefix if prefix.endswith("/") else os.path.dirname(prefix) + "/"

    def path_for(self, namespace: str, vm: str) -> str:
        for what, value in (("namespace", namespace), ("vm", vm)):
            if not DNS1123_LABEL.match(value):
                raise InvalidSpec(f"{what} {value!r} is not a DNS-1123 label")
        path = self.template.format(namespace=namespace, vm=vm)
        normalized = os.path.normpath(path)
        if not normalized.startswith(self.fixed_directory):
            raise InvalidSpec(f"socket path {path!r} leaves {self.fixed_directory}")
        length = len(normalized.encode())
        if length > MAX_SOCKET_PATH_BYTES:
            raise InvalidSpec(
                f"socket path {path!r} is {length} bytes long; unix socket paths allow at most "
                f"{MAX_SOCKET_PATH_BYTES} (shorten the VM name or the socket template)"
            )
        return normalized


@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    socket_template: SocketTemplate
    watch_namespace: str | None = None
    #: At most one progress write per object per interval (transitions are written at once).
    status_interval: float = 2.0
    #: How often a running job's progress is read from QEMU.
    poll_interval: float = 1.0
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    #: Bounded wait for QEMU to confirm a cancel on delete before the finalizer goes anyway.
    delete_timeout: float = 30.0
    #: How long a VM may be gone mid-job before the pull fails with VMExited.
    vm_gone_grace: float = 60.0
    #: Backoff ceiling while Pending (VM missing, QEMU unavailable, disk busy).
    pending_backoff_max: float = 5.0
    liveness_port: int | None = 8080
    #: The agent's log level (BLOCKPULL_LOG_LEVEL): DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"
    #: Prometheus metrics at http://0.0.0.0:PORT/metrics; None: not served.
    metrics_port: int | None = DEFAULT_METRICS_PORT
    #: BLOCKPULL_LIBVIRT_URI: when set, this agent's VMs are libvirt domains reached through it
    #: (libvirt's block-job API) instead of QMP sockets.
    libvirt_uri: URITemplate | None = None
    #: BLOCKPULL_DOMAIN_TEMPLATE: the libvirt domain name of (namespace, spec.vm).
    domain_template: DomainTemplate = field(default_factory=DomainTemplate)
    #: BLOCKPULL_MAX_CONCURRENT: at most this many jobs in QEMU at once on the node; 0: no limit.
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    #: BLOCKPULL_NODE_BANDWIDTH: bytes/s shared max-min fairly by the node's copying jobs; 0: none.
    node_bandwidth: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AgentSettings:
        env = os.environ if env is None else env
        node = env.get("NODE_NAME", "").strip()
        if not node:
            raise InvalidSpec(
                "NODE_NAME is required: the node this agent serves (downward API spec.nodeName)"
            )
        if not DNS1123_SUBDOMAIN.match(node):
            raise InvalidSpec(f"NODE_NAME {node!r} is not a valid node name")
        namespace = env.get("BLOCKPULL_WATCH_NAMESPACE", "").strip() or None
        if namespace is not None and not DNS1123_LABEL.match(namespace):
            raise InvalidSpec(f"BLOCKPULL_WATCH_NAMESPACE {namespace!r} is not a DNS-1123 label")
        port = env.get("BLOCKPULL_LIVENESS_PORT", "8080").strip()
        liveness_port = None if port in ("", "0", "off") else _port("BLOCKPULL_LIVENESS_PORT", port)
        metrics = env.get("BLOCKPULL_METRICS_PORT", str(DEFAULT_METRICS_PORT)).strip()
        metrics_port = None if metrics in ("", "0", "off") else _port("BLOCKPULL_METRICS_PORT", metrics)
        if metrics_port is not None and metrics_port == liveness_port:
            raise InvalidSpec(
                f"BLOCKPULL_METRICS_PORT and BLOCKPULL_LIVENESS_PORT are both {metrics_port}; "
                "they must differ"
            )
        raw_uri = env.get("BLOCKPULL_LIBVIRT_URI", "").strip()
        libvirt_uri = URITemplate(raw_uri) if raw_uri else None
        domains = DomainTemplate(env.get("BLOCKPULL_DOMAIN_TEMPLATE", "").strip() or DEFAULT_DOMAIN_TEMPLATE)
        if libvirt_uri is not None and not domains.has_namespace and namespace is None:
            raise InvalidSpec(
                f"BLOCKPULL_DOMAIN_TEMPLATE {domains.template!r} has no {{namespace}}: a BlockPull of "
                "any namespace could reach every domain of the node; set BLOCKPULL_WATCH_NAMESPACE "
                "to serve one namespace, or put {namespace} in the template"
            )
        return cls(
            node_name=node,
            socket_template=SocketTemplate(env.get("BLOCKPULL_SOCKET_TEMPLATE", DEFAULT_SOCKET_TEMPLATE)),
            watch_namespace=namespace,
            status_interval=_seconds(env, "BLOCKPULL_STATUS_INTERVAL", 2.0),
            poll_interval=_seconds(env, "BLOCKPULL_POLL_INTERVAL", 1.0),
            connect_timeout=_seconds(env, "BLOCKPULL_CONNECT_TIMEOUT", 5.0),
            command_timeout=_seconds(env, "BLOCKPULL_COMMAND_TIMEOUT", 10.0),
            delete_timeout=_seconds(env, "BLOCKPULL_DELETE_TIMEOUT", 30.0),
            vm_gone_grace=_seconds(env, "BLOCKPULL_VM_GONE_GRACE", 60.0),
            pending_backoff_max=_seconds(env, "BLOCKPULL_PENDING_BACKOFF_MAX", 5.0),
            liveness_port=liveness_port,
            metrics_port=metrics_port,
            log_level=_log_level(env.get("BLOCKPULL_LOG_LEVEL", "INFO")),
            libvirt_uri=libvirt_uri,
            domain_template=domains,
            max_concurrent=_count(env, "BLOCKPULL_MAX_CONCURRENT", DEFAULT_MAX_CONCURRENT),
            node_bandwidth=_bandwidth(env, "BLOCKPULL_NODE_BANDWIDTH"),
        )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidSpec(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise InvalidSpec(f"{name} must be a positive, finite number of seconds, got {raw!r}")
    return value


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise InvalidSpec(f"{name} must be a whole number (0: no limit), got {raw!r}")
    return int(raw)


def _bandwidth(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name, "").strip()
    try:
        return parse_bandwidth(int(raw) if raw.isdigit() else raw or None)
    except InvalidSpec as exc:
        raise InvalidSpec(f"{name}: {exc.message} (0 or unset: no budget)") from None


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(raw: str) -> str:
    level = raw.strip().upper() or "INFO"
    if level not in _LOG_LEVELS or not isinstance(logging.getLevelName(level), int):
        raise InvalidSpec(f"BLOCKPULL_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {raw!r}")
    return level


def _port(name: str, raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise InvalidSpec(f"{name} must be a TCP port (1-65535, or 0/off), got {raw!r}")
    return int(raw)
