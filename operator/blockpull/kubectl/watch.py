"""List, then watch from the listing's resourceVersion, in a thread; never poll.

Owns the connection to the API for following BlockPulls: the official client's
`kubernetes.watch.Watch` with `resourceVersion` and bookmarks, resumed from the last seen
resourceVersion when the server ends a watch or the connection drops or goes silent, a fresh
listing after `410 Gone` (the server forgot that far back), and a backoff while the API server
cannot be reached. What it learns goes into a queue as `Listed`, `Changed`, `Trouble`,
`Recovered` or `Fatal` items, so that the command's own thread keeps drawing, counting its
timeout and taking Ctrl-C while a connection is down.

Why a silent connection is dropped: a watch that has neither an event nor a bookmark for
`request_timeout` seconds is indistinguishable from a dead connection (a proxy that dropped
it without a reset); resuming it costs one request and loses nothing.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError, ReadTimeoutError

from blockpull.kubectl.config import EXIT_INTERNAL, GROUP, PLURAL, VERSION, PluginError, Target, api_error

#: Server-side length of one watch request; it then ends normally and is resumed.
WATCH_SECONDS = 300
#: After trouble: a watch this short proves the way clear even when nothing changes.
PROBE_SECONDS = 2
#: Backoff while the API server cannot be reached: doubles from MIN up to MAX seconds.
BACKOFF_MIN, BACKOFF_MAX = 0.5, 5.0
#: How long stop() waits for the thread (a read in progress is cut by closing its socket).
STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Listed:
    """A full listing: the objects now, replacing whatever was known."""

    items: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True)
class Changed:
    kind: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]


@dataclass(frozen=True)
class Trouble:
    """The watch broke and is being re-established (shown once, until `Recovered`)."""

    message: str


@dataclass(frozen=True)
class Recovered:
    """The watch is up again after a `Trouble`."""


@dataclass(frozen=True)
class Fatal:
    """Retrying cannot help (access refused, CRD gone): the command ends with this error."""

    error: PluginError


Item = Listed | Changed | Trouble | Recovered | Fatal


@dataclass(frozen=True)
class Scope:
    """Which objects: one namespace or all, with optional label and field selectors."""

    namespace: str | None  # None: all namespaces
    label_selector: str | None = None
    field_selector: str | None = None

    def describe(self) -> str:
        return "all namespaces" if self.namespace is None else f'namespace "{self.namespace}"'


class Watcher:
    """Follows a scope in a daemon thread; read `items` (a queue) from the command's thread."""

    def __init__(self, target: Target, scope: Scope) -> None:
        self.target = target
        self.scope = scope
        self.items: queue.Queue[Item] = queue.Queue()
        self._stop = threading.Event()
        self._watch: kubernetes.watch.Watch | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="blockpull-watch", daemon=True)
        self._start_rv = ""
        self._established = False
        self._troubled = False
        self._backoff = BACKOFF_MIN

    def list_now(self) -> Listed:
        """The first listing, in the caller's thread: its errors end the command at once."""
        with self.target.api_client() as client:
            try:
                return self._list(kubernetes.client.CustomObjectsApi(client))
            except (ApiException, HTTPError, OSError) as exc:
                raise api_error(exc, f"listing {PLURAL} in {self.scope.describe()}") from None

    def start(self, resource_version: str) -> None:
        """Watch from the first listing's resourceVersion on."""
        self._start_rv = resource_version
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._watch is not None:
                self._watch.stop()  # type: ignore[no-untyped-call]  # unblocks a read in progress
        # Joined, not left to die with the interpreter: a daemon thread still inside urllib3
        # at exit made the process abort (SIGABRT) after its output was complete.
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_TIMEOUT)

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        rv = self._start_rv
        self._backoff = BACKOFF_MIN
        client = self.target.api_client()
        api = kubernetes.client.CustomObjectsApi(client)
        try:
            while not self._stop.is_set():
                try:
                    if rv == "":  # 410 Gone earlier: list again, from now
                        listed = self._list(api)
                        rv = listed.resource_version
                        self.items.put(listed)
                    rv = self._watch_once(api, rv)
                    continue
                except _Gone:
                    rv = ""  # relist at once: nothing is wrong with the connection
                    continue
                except ApiException as exc:
                    if exc.status in (401, 403, 404):
                        self.items.put(Fatal(api_error(exc, f"watching {PLURAL} in {self.scope.describe()}")))
                        return
                    message = f"the API server answered {exc.status} ({exc.reason})"
                except (HTTPError, OSError, ValueError) as exc:
                    # ValueError: urllib3 reading from a response closed under it (stop()).
                    message = f"watch connection lost ({type(exc).__name__})"
                    if isinstance(exc, ReadTimeoutError) and self._established:
                        # The watch was up and then silent for request_timeout: resume it at
                        # once, unremarked (a quiet namespace looks exactly like this).
                        continue
                if self._stop.is_set():
                    return
                if not self._troubled:
                    self.items.put(Trouble(f"{message}; re-establishing the watch"))
                    self._troubled = True
                self._stop.wait(self._backoff)
                self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        except Exception as exc:  # a bug: end the command saying so, never hang silently
            self.items.put(Fatal(PluginError(f"internal error in the watch: {exc!r}", EXIT_INTERNAL)))
        finally:
            client.close()  # type: ignore[no-untyped-call]

    def _watch_once(self, api: kubernetes.client.CustomObjectsApi, rv: str) -> str:
        """One watch request from `rv` until the server ends it; the last resourceVersion seen."""
        watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        with self._lock:
            if self._stop.is_set():
                return rv
            self._watch = watch
        kwargs: dict[str, Any] = {
            "resource_version": rv,
            # After trouble, a short watch first: it ending normally proves the way is clear
            # even when nothing changes (a 200 alone does not: an error may follow as an
            # ERROR event).
            "timeout_seconds": PROBE_SECONDS if self._troubled else WATCH_SECONDS,
            "allow_watch_bookmarks": True,
            # (connect, read): a read that waits longer than this is a dead connection.
            "_request_timeout": (self.target.request_timeout, self.target.request_timeout),
        }
        kwargs.update(self._selectors())
        func, args = self._list_call(api)
        self._established = False

        def call(*a: Any, **kw: Any) -> Any:
            response = func(*a, **kw)
            status = getattr(response, "status", 200)
            if not 200 <= status <= 299:  # unpreloaded answers are not checked by the client
                body = response.data
                response.release_conn()
                raise ApiException(status=status, reason=getattr(response, "reason", ""), body=body)
            self._established = True  # the server answered: a later silence is not a failure
            return response

        try:
            # Through `call`, the client does not deserialize: each event's `raw_object` is
            # the object as the server sent it, which is what is used here.
            for event in watch.stream(call, *args, **kwargs):  # type: ignore[no-untyped-call]
                if not isinstance(event, dict):
                    continue  # a blank keep-alive line
                kind = event.get("type")
                obj = event.get("raw_object")
                if kind == "ERROR":
                    continue  # the client raises for these; defensive only
                if isinstance(obj, dict):
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    self._recovered()
                if kind in ("ADDED", "MODIFIED", "DELETED") and isinstance(obj, dict):
                    self.items.put(Changed(str(kind), obj))
                if self._stop.is_set():
                    break
        except ApiException as exc:
            if exc.status == 410:
                raise _Gone from None
            raise
        finally:
            with self._lock:
                self._watch = None
        self._recovered()  # ended normally (server-side timeout, or the server closed it)
        return rv

    def _recovered(self) -> None:
        self._backoff = BACKOFF_MIN
        if self._troubled:  # said as soon as the watch is back, not when it next ends
            self._troubled = False
            self.items.put(Recovered())

    def _list(self, api: kubernetes.client.CustomObjectsApi) -> Listed:
        func, args = self._list_call(api)
        body = func(*args, **self._selectors(), _request_timeout=self.target.request_timeout)
        items = [dict(item) for item in body.get("items") or []]
        for item in items:  # list items carry no kind; kubectl-style JSON output wants it
            item.setdefault("apiVersion", f"{GROUP}/{VERSION}")
            item.setdefault("kind", "BlockPull")
        return Listed(items, str((body.get("metadata") or {}).get("resourceVersion") or ""))

    def _list_call(self, api: kubernetes.client.CustomObjectsApi) -> tuple[Any, tuple[str, ...]]:
        if self.scope.namespace is None:
            return api.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
        return api.list_namespaced_custom_object, (GROUP, VERSION, self.scope.namespace, PLURAL)

    def _selectors(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.scope.label_selector:
            out["label_selector"] = self.scope.label_selector
        if self.scope.field_selector:
            out["field_selector"] = self.scope.field_selector
        return out


class _Gone(Exception):
    """410: the resourceVersion is older than the server keeps; list again."""
