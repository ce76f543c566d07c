"""Which cluster, user and namespace: kubectl's kubeconfig rules, and API errors in one line.

Owns: resolving `--kubeconfig` / `$KUBECONFIG` (a `:`-separated list, merged) / `~/.kube/config`
/ in-cluster service account the way kubectl does, `--context`, the default namespace (the
context's, else `default`), building official-client `ApiClient`s from that, and the plugin's
error type with its exit status.

The official client reads `$KUBECONFIG` once, at import time; every path is therefore resolved
here and passed explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

GROUP, VERSION, PLURAL = "blockpull.dev", "v1alpha1", "blockpulls"
RESOURCE = f"{PLURAL}.{GROUP}"  # as kubectl names it in errors
KIND_PREFIX = f"blockpull.{GROUP}"  # as kubectl prints an object: blockpull.blockpull.dev/NAME

EXIT_OK = 0
#: A pull failed (or was deleted before it had an outcome).
EXIT_FAILED = 1
#: Bad command line or input: unknown object, no kubeconfig, unknown context, bad value.
EXIT_USAGE = 2
#: The cluster could not be asked: API server unreachable, access refused, CRD not installed.
EXIT_API = 3
#: A bug in the plugin (an exception it did not expect).
EXIT_INTERNAL = 70
#: `--timeout` expired first, as timeout(1) exits.
EXIT_TIMEOUT = 124
#: 128 + N for signal N (130 Ctrl-C, 143 SIGTERM).
EXIT_SIGNAL_BASE = 128

_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class PluginError(Exception):
    """Anything the plugin reports as one line and an exit status."""

    def __init__(self, message: str, exit_status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status


@dataclass(frozen=True)
class Target:
    """Where to talk to: a kubeconfig (or in-cluster), its context and the namespace to use."""

    config_files: str | None  # `:`-joined existing kubeconfig files; None means in-cluster
    context: str | None
    namespace: str
    request_timeout: float

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new client (one per thread: the watch thread gets its own)."""
        try:
            if self.config_files is None:
                configuration = kubernetes.client.Configuration()
                kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
                return kubernetes.client.ApiClient(configuration)
            client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=self.config_files, context=self.context, persist_config=False
            )
            return client
        except ConfigException as exc:
            raise PluginError(f"invalid kubeconfig: {exc}") from None


def resolve(
    *,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    request_timeout: float,
    environ: dict[str, str] | None = None,
) -> Target:
    """kubectl's precedence: --kubeconfig, else $KUBECONFIG, else ~/.kube/config, else in-cluster."""
    env = dict(os.environ if environ is None else environ)
    files = _config_files(kubeconfig, env)
    if files is None:
        if env.get("KUBERNETES_SERVICE_HOST") and (_SERVICE_ACCOUNT / "token").exists():
            if context:
                raise PluginError(f'context "{context}" does not exist (running in-cluster, no kubeconfig)')
            return Target(None, None, namespace or _in_cluster_namespace(), request_timeout)
        raise PluginError(
            "no kubeconfig: none given with --kubeconfig, $KUBECONFIG names no existing file and "
            "~/.kube/config does not exist"
        )
    contexts, current = _contexts(files)
    names = [c.get("name") for c in contexts]
    if context is not None and context not in names:
        raise PluginError(f'context "{context}" does not exist in {_describe(files)}')
    chosen_name = context or (current or {}).get("name")
    if not chosen_name:
        raise PluginError(f"{_describe(files)} has no current-context; pass --context")
    chosen = next((c for c in contexts if c.get("name") == chosen_name), {})
    default_ns = ((chosen.get("context") or {}).get("namespace")) or "default"
    return Target(files, context, namespace or default_ns, request_timeout)


def _config_files(explicit: str | None, env: dict[str, str]) -> str | None:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise PluginError(f"--kubeconfig {explicit}: no such file")
        return str(path)
    listed = env.get("KUBECONFIG")
    if listed:
        existing = [str(Path(p).expanduser()) for p in listed.split(os.pathsep) if p]
        existing = [p for p in existing if Path(p).is_file()]
        return os.pathsep.join(existing) if existing else None
    home = Path(env.get("HOME") or Path.home()) / ".kube" / "config"
    return str(home) if home.is_file() else None


def _contexts(files: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    try:
        contexts, current = kubernetes.config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=files
        )
    except ConfigException as exc:
        raise PluginError(f"invalid kubeconfig {_describe(files)}: {exc}") from None
    except Exception as exc:  # a YAML error, a file that is not a mapping...
        raise PluginError(f"cannot read kubeconfig {_describe(files)}: {exc}") from None
    return list(contexts or []), current


def _describe(files: str) -> str:
    return ", ".join(files.split(os.pathsep))


def _in_cluster_namespace() -> str:
    try:
        return (_SERVICE_ACCOUNT / "namespace").read_text().strip() or "default"
    except OSError:
        return "default"


def api_error(exc: BaseException, what: str) -> PluginError:
    """One line for an API failure while doing `what` (e.g. 'listing blockpulls in "vms"')."""
    if isinstance(exc, ApiException):
        detail = _status_message(exc)
        if exc.status == 404:
            return PluginError(
                f"{what}: the server does not serve {RESOURCE}/{VERSION} (is the BlockPull CRD "
                f"installed?): {detail}",
                EXIT_API,
            )
        if exc.status in (401, 403):
            return PluginError(f"{what}: access refused ({exc.status}): {detail}", EXIT_API)
        if exc.status in (400, 409, 422):
            return PluginError(f"{what}: {detail}", EXIT_USAGE)
        return PluginError(f"{what}: the API server answered {exc.status}: {detail}", EXIT_API)
    return PluginError(f"{what}: cannot reach the API server: {_short(exc)}", EXIT_API)


def _status_message(exc: ApiException) -> str:
    import json  # noqa: PLC0415 - only on the error path

    try:
        body = json.loads(exc.body or "")
        return str(body.get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason or exc.body or exc.status)


def _short(exc: BaseException) -> str:
    # urllib3 wraps the cause several times; its innermost reason is the readable part.
    reason = getattr(exc, "reason", None)
    while reason is not None and getattr(reason, "reason", None) is not None:
        reason = reason.reason
    text = str(reason or exc)
    return " ".join(text.split())[:300]
