"""The server object tests hold: lifecycle, the aiohttp listener, and the test-facing API.

Owns starting/stopping the HTTP listener on a free port, the pre-created namespaces, the
test helpers (object snapshots, direct creation, YAML loading, kubeconfig files, fault injection,
watch expiry, the request log) and ``run_in_thread``: the same server on a private event loop in
a background thread, for synchronous tests, kubectl subprocesses and agents run as subprocesses.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import yaml
from aiohttp import web

from testapiserver import errors
from testapiserver.faults import FailureRule, Faults, Predicate, matcher, reason_for
from testapiserver.handlers import Handlers
from testapiserver.kubeconfig import write_kubeconfig
from testapiserver.recording import (
    Permission,
    RecordedRequest,
    filter_requests,
    missing_permissions,
    used_permissions,
)
from testapiserver.resources import Registry, ResourceType, builtin_types
from testapiserver.store import Store, WriteOptions
from testapiserver.watch import WatchHub

T = TypeVar("T")
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class APIServer:
    """An in-process Kubernetes API server stand-in (see the package docstring for its limits)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_size: int = 1000,
        bookmark_interval: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.url = ""
        self.registry = Registry()
        for rtype in builtin_types():
            self.registry.add(rtype)
        self.hub = WatchHub(history_size)
        self.store = Store(self.registry, self.hub)
        self.requests: list[RecordedRequest] = []
        self.faults = Faults()
        self._runner: web.AppRunner | None = None
        for name in SYSTEM_NAMESPACES:
            self.create_namespace(name)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the test API server is already running")
        handlers = Handlers(self)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handlers.handle)
        # handler_cancellation: a client that hangs up ends its watch handler at once.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        sockname = runner.addresses[0]
        self.port = int(sockname[1])
        self.url = f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.hub.close_all()  # watches end first, so the listener shuts down without waiting
        await asyncio.sleep(0)
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- clients -------------------------------------------------------------------------------

    def write_kubeconfig(self, path: Path, user: str = "admin", namespace: str = "default") -> Path:
        if not self.url:
            raise RuntimeError("start the server before writing a kubeconfig")
        return write_kubeconfig(Path(path), self.url, user, namespace)

    # --- objects -------------------------------------------------------------------------------

    def resource_type(self, group: str, version: str, plural: str) -> ResourceType:
        rtype = self.registry.find(group, version, plural)
        if rtype is None:
            raise KeyError(f"{plural}.{group}/{version} is not served")
        return rtype

    def _type_of(self, obj: dict[str, Any]) -> ResourceType:
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        for rtype in self.registry.all():
            if rtype.group == group and rtype.version == version and rtype.kind == obj.get("kind"):
                return rtype
        raise KeyError(f"no served resource for {obj.get('apiVersion')} {obj.get('kind')}")

    def objects(
        self, group: str, version: str, plural: str, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        """Deep copies of the stored objects of one resource (all namespaces by default)."""
        return self.store.snapshot(self.resource_type(group, version, plural), namespace)

    def get_object(
        self, group: str, version: str, plural: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            return self.store.get(self.resource_type(group, version, plural), namespace, name)
        except errors.APIError:
            return None

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create an object directly (not over HTTP, not recorded), as a real server would."""
        rtype = self._type_of(obj)
        if rtype.namespaced:
            namespace = namespace or (obj.get("metadata") or {}).get("namespace") or "default"
        return self.store.create(rtype, namespace, obj, WriteOptions(user="system:test")).obj

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name}
        if labels:
            meta["labels"] = labels
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})

    def load_yaml(self, source: Path | str) -> list[dict[str, Any]]:
        """Create every document of a YAML file (or text); CRDs go first."""
        text = Path(source).read_text() if isinstance(source, Path) else source
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        docs.sort(key=lambda d: d.get("kind") != "CustomResourceDefinition")
        return [self.create(doc) for doc in docs]

    # --- faults --------------------------------------------------------------------------------

    def inject_failures(
        self,
        predicate: Predicate | None = None,
        *,
        count: int | None = 1,
        status: int | None = 500,
        reason: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
        retry_after: int | None = None,
        method: str | None = None,
        verb: str | None = None,
        group: str | None = None,
        resource: str | None = None,
        subresource: str | None = None,
        namespace: str | None = None,
        name: str | None = None,
        user: str | None = None,
    ) -> FailureRule:
        """Fail the next ``count`` requests matching all given criteria (``None``: forever).

        ``status=None`` with ``delay`` only slows the matching requests down.
        """
        code = status or 500
        rule = FailureRule(
            predicate=matcher(
                predicate,
                method=method,
                verb=verb,
                group=group,
                resource=resource,
                subresource=subresource,
                namespace=namespace,
                name=name,
                user=user,
            ),
            remaining=count,
            status=status,
            reason=reason or reason_for(code),
            message=message or f"injected failure ({code})",
            delay=delay,
            retry_after=retry_after,
        )
        return self.faults.add(rule)

    def clear_failures(self) -> None:
        self.faults.clear()

    def expire_watches(self) -> None:
        """Close every open watch and forget all history: clients re-watching get 410 Gone."""
        self.hub.expire(self.store.bump())

    @property
    def open_watches(self) -> int:
        return self.hub.open_watches

    # --- request log ---------------------------------------------------------------------------

    def requests_by(
        self,
        *,
        user: str | None = None,
        verb: str | Iterable[str] | None = None,
        resource: str | None = None,
        group: str | None = None,
        writes_only: bool = False,
    ) -> list[RecordedRequest]:
        return filter_requests(
            list(self.requests), user=user, verb=verb, resource=resource, group=group, writes_only=writes_only
        )

    def used_permissions(self, user: str | None = None) -> set[Permission]:
        return used_permissions(list(self.requests), user)

    def missing_permissions(
        self, rules: Iterable[dict[str, Any]], user: str | None = None
    ) -> set[Permission]:
        return missing_permissions(rules, list(self.requests), user)

    @property
    def skipped_rules(self) -> list[str]:
        """CEL rules that could not be evaluated here (see ``testapiserver.cel``)."""
        out: list[str] = []
        for rtype in self.registry.all():
            if rtype.rules is not None:
                out += [r for r in rtype.rules.skipped if r not in out]
        return out


class ThreadedAPIServer:
    """An ``APIServer`` running on its own loop in a daemon thread; methods are thread-safe."""

    def __init__(self, server: APIServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.server = server
        self._loop = loop
        self._thread = thread

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self.server.requests)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the server's loop and return its result."""

        async def run() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._await(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path, user: str = "admin", namespace: str = "default") -> Path:
        return self.server.write_kubeconfig(path, user, namespace)

    def objects(
        self, group: str, version: str, plural: str, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        return self.call(self.server.objects, group, version, plural, namespace)

    def get_object(
        self, group: str, version: str, plural: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        return self.call(self.server.get_object, group, version, plural, name, namespace)

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        return self.call(self.server.create, obj, namespace)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        return self.call(self.server.create_namespace, name, labels)

    def load_yaml(self, source: Path | str) -> list[dict[str, Any]]:
        return self.call(self.server.load_yaml, source)

    def inject_failures(self, predicate: Predicate | None = None, **kwargs: Any) -> FailureRule:
        return self.server.inject_failures(predicate, **kwargs)  # Faults is lock-protected

    def clear_failures(self) -> None:
        self.server.clear_failures()

    def expire_watches(self) -> None:
        self.call(self.server.expire_watches)

    @property
    def open_watches(self) -> int:
        return self.call(lambda: self.server.open_watches)

    def requests_by(self, **kwargs: Any) -> list[RecordedRequest]:
        return self.server.requests_by(**kwargs)

    def used_permissions(self, user: str | None = None) -> set[Permission]:
        return self.server.used_permissions(user)

    def missing_permissions(
        self, rules: Iterable[dict[str, Any]], user: str | None = None
    ) -> set[Permission]:
        return self.server.missing_permissions(rules, user)


def run_in_thread(*, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> ThreadedAPIServer:
    """Start an ``APIServer`` in a background thread; returns once it is listening."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            server = APIServer(host=host, port=port, **kwargs)
            loop.run_until_complete(server.start())
            holder["server"] = server
        except BaseException as exc:  # reported to the starting thread below
            holder["error"] = exc
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=main, name="testapiserver", daemon=True)
    thread.start()
    ready.wait(timeout=30)
    if "error" in holder:
        raise holder["error"]
    if "server" not in holder:
        raise RuntimeError("the test API server did not start in 30 s")
    return ThreadedAPIServer(holder["server"], loop, thread)
