"""The HTTP layer: routing Kubernetes URLs, decoding requests, encoding answers, streaming watches.

Owns the mapping from an HTTP request to (verb, group, version, resource, namespace, name,
subresource) exactly as a real server's request-info resolver does, the query parameters
(selectors, ``limit``/``continue``, ``dryRun``, ``fieldManager``, ``fieldValidation``, ``force``,
``propagationPolicy``, ``watch``/``resourceVersion``/``timeoutSeconds``/``allowWatchBookmarks``/
``sendInitialEvents``), content types (JSON, YAML, the four patch types; Table answers for
``kubectl get``), recording each request and applying injected faults before anything else.

Watches are ``application/json`` streams of one JSON event per line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

from testapiserver import discovery, errors, protobuf, tables
from testapiserver.errors import APIError
from testapiserver.recording import RecordedRequest
from testapiserver.resources import ResourceType
from testapiserver.selectors import Selection, parse_field_selector, parse_label_selector
from testapiserver.store import APPLY, JSON_PATCH, MERGE, STRATEGIC, WriteOptions
from testapiserver.watch import Change, event_for

if TYPE_CHECKING:
    from testapiserver.server import APIServer

logger = logging.getLogger(__name__)

_PATCH_TYPES = (MERGE, JSON_PATCH, STRATEGIC, APPLY)
_TRUE = ("true", "1")
PROTOBUF = "application/vnd.kubernetes.protobuf"
# kubectl's imperative generators (create namespace/configmap/...) send protobuf bodies.
_BODY_TYPES = ("application/json", "application/yaml", PROTOBUF)


@dataclass
class Route:
    """What a URL addresses (``resource is None`` for discovery and other non-resource URLs)."""

    group: str | None = None
    version: str | None = None
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    legacy_watch: bool = False


def _user_of(request: web.Request) -> str:
    # kubectl/client-go send no bearer token over plain http, but do send impersonation headers
    # (the kubeconfig's ``as:``); a real server records the impersonated user too.
    impersonated = request.headers.get("Impersonate-User", "").strip()
    if impersonated:
        return impersonated
    auth = request.headers.get("Authorization", "")
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if scheme.lower() == "basic" and credentials.strip():
        try:
            decoded = base64.b64decode(credentials.strip()).decode()
        except (binascii.Error, UnicodeDecodeError):
            return "anonymous"
        return decoded.partition(":")[0] or "anonymous"
    return "anonymous"


def _json(body: Any, status: int = 200, warnings: list[str] | None = None) -> web.Response:
    resp = web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/json",
    )
    for warning in warnings or []:
        resp.headers.add("Warning", f'299 - "{warning}"')
    return resp


def _error(exc: APIError) -> web.Response:
    resp = _json(exc.status(), exc.code)
    retry = exc.details.get("retryAfterSeconds") if exc.details else None
    if retry is not None:
        resp.headers["Retry-After"] = str(retry)
    return resp


class Handlers:
    def __init__(self, server: APIServer) -> None:
        self.server = server

    @property
    def store(self) -> Any:
        return self.server.store

    # --- entry point ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path)
        query = {k: v for k, v in request.query.items()}
        verb = self._verb(request.method, route, query)
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=query,
            user=_user_of(request),
            verb=verb,
            group=route.group if route.resource else None,
            version=route.version if route.resource else None,
            resource=route.resource,
            subresource=route.subresource,
            namespace=route.namespace,
            name=route.name,
            content_type=request.headers.get("Content-Type"),
            user_agent=request.headers.get("User-Agent"),
        )
        self.server.requests.append(record)
        try:
            response = await self._dispatch(request, route, record)
        except APIError as exc:
            response = _error(exc)
        except Exception as exc:
            logger.exception("test API server failed on %s %s", request.method, request.path_qs)
            response = _error(errors.internal(f"{type(exc).__name__}: {exc}"))
        record.status = response.status
        return response

    async def _dispatch(
        self, request: web.Request, route: Route, record: RecordedRequest
    ) -> web.StreamResponse:
        rule = self.server.faults.hit(record)
        if rule is not None:
            if rule.delay:
                await asyncio.sleep(rule.delay)
            if rule.status is not None:
                record.injected = True
                raise rule.error()
        if route.resource is None:
            return self._non_resource(request, route)
        return await self._resource(request, route, record)

    # --- routing -------------------------------------------------------------------------------

    def _route(self, path: str) -> Route:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] not in ("api", "apis"):
            return Route()
        if parts[0] == "api":
            if len(parts) < 2:
                return Route()
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) < 3:
                return Route(group=parts[1] if len(parts) > 1 else None)
            group, version, rest = parts[1], parts[2], parts[3:]
        route = Route(group=group, version=version)
        if not rest:
            return route
        if rest[0] == "watch":
            route.legacy_watch = True
            rest = rest[1:]
        if len(rest) >= 3 and rest[0] == "namespaces":
            third = self.server.registry.find(group, version, rest[2])
            if third is not None and third.namespaced:
                route.namespace = rest[1]
                rest = rest[2:]
        if rest:
            route.resource = rest[0]
        if len(rest) > 1:
            route.name = rest[1]
        if len(rest) > 2:
            route.subresource = "/".join(rest[2:])
        return route

    @staticmethod
    def _verb(method: str, route: Route, query: dict[str, str]) -> str:
        if route.resource is None:
            return method.lower()
        if method in ("GET", "HEAD"):
            if route.legacy_watch or query.get("watch", "").lower() in _TRUE:
                return "watch"
            return "get" if route.name else "list"
        return {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if route.name else "deletecollection",
        }.get(method, method.lower())

    # --- non-resource URLs ---------------------------------------------------------------------

    def _non_resource(self, request: web.Request, route: Route) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise errors.method_not_allowed()
        registry = self.server.registry
        parts = [p for p in request.path.split("/") if p]
        if not parts:
            paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/openapi/v3", "/readyz", "/version"]
            for group in registry.groups():
                paths.append(f"/apis/{group}")
                paths += [f"/apis/{group}/{v}" for v in registry.versions_of(group)]
            return _json({"paths": sorted(paths)})
        if parts == ["version"]:
            return _json(discovery.VERSION_INFO)
        if parts[0] in ("healthz", "livez", "readyz"):
            return web.Response(text="ok", content_type="text/plain")
        if parts == ["api"]:
            return _json(discovery.api_versions(f"{request.host}"))
        if parts == ["apis"]:
            return _json(discovery.api_group_list(registry))
        if parts[0] == "api" and len(parts) == 2:
            found = discovery.api_resource_list(registry, "", parts[1])
            if found is None:
                raise errors.resource_not_found(request.path)
            return _json(found)
        if parts[0] == "apis" and len(parts) == 2:
            group_doc = discovery.api_group(registry, parts[1])
            if group_doc is None:
                raise errors.resource_not_found(request.path)
            return _json(group_doc)
        if parts[0] == "apis" and len(parts) == 3:
            found = discovery.api_resource_list(registry, parts[1], parts[2])
            if found is None:
                raise errors.resource_not_found(request.path)
            return _json(found)
        if parts[:2] == ["openapi", "v3"]:
            if len(parts) == 2:
                return _json(discovery.openapi_v3_index(registry))
            gv = parts[2:]
            doc = None
            if gv[0] == "api" and len(gv) == 2:
                doc = discovery.openapi_v3_document(registry, "", gv[1])
            elif gv[0] == "apis" and len(gv) == 3:
                doc = discovery.openapi_v3_document(registry, gv[1], gv[2])
            if doc is None:
                raise errors.resource_not_found(request.path)
            resp = _json(doc)
            if "hash" in request.query:
                resp.headers["Cache-Control"] = "public, immutable"
            return resp
        raise errors.resource_not_found(request.path)

    # --- resource URLs -------------------------------------------------------------------------

    def _resource_type(self, route: Route) -> ResourceType:
        assert route.group is not None and route.version is not None and route.resource
        rtype = self.server.registry.find(route.group, route.version, route.resource)
        if rtype is None:
            raise errors.resource_not_found(route.resource)
        if route.namespace is not None and not rtype.namespaced:
            raise errors.resource_not_found(route.resource)
        if route.subresource is not None and route.subresource not in rtype.subresources:
            raise errors.resource_not_found(f"{route.resource}/{route.subresource}")
        return rtype

    async def _resource(
        self, request: web.Request, route: Route, record: RecordedRequest
    ) -> web.StreamResponse:
        rtype = self._resource_type(route)
        verb = record.verb
        if verb not in rtype.verbs and route.subresource is None:
            raise errors.method_not_allowed()
        query = record.query
        store = self.store
        opts = self._write_options(query, record.user)
        if verb == "get":
            assert route.name is not None
            obj = store.get(rtype, route.namespace, route.name)
            if tables.wants_table(request.headers.get("Accept", "")):
                return _json(
                    tables.table(
                        rtype,
                        [obj],
                        resource_version=obj["metadata"].get("resourceVersion", ""),
                        include_object=query.get("includeObject", "Metadata"),
                    )
                )
            return _json(obj)
        if verb == "list":
            return self._list(request, route, rtype, query)
        if verb == "watch":
            return await self._watch(request, route, rtype, record)
        if verb == "create":
            if route.name is not None:
                raise errors.method_not_allowed()
            if rtype.namespaced and route.namespace is None:
                raise errors.method_not_allowed()
            body = await self._body(request, _BODY_TYPES)
            record.body = body
            result = store.create(rtype, route.namespace, body, opts)
            return _json(result.obj, result.code, result.warnings)
        if verb == "update":
            assert route.name is not None
            body = await self._body(request, _BODY_TYPES)
            record.body = body
            result = store.replace(
                rtype, route.namespace, route.name, body, subresource=route.subresource, opts=opts
            )
            return _json(result.obj, result.code, result.warnings)
        if verb == "patch":
            assert route.name is not None
            ctype = _media_type(request)
            if ctype not in _PATCH_TYPES:
                raise errors.unsupported_media_type(ctype, [JSON_PATCH, MERGE, APPLY, STRATEGIC])
            if ctype == STRATEGIC and rtype.custom:
                raise errors.unsupported_media_type(ctype, [JSON_PATCH, MERGE, APPLY])
            body = await self._body(request, (ctype,))
            record.body = body
            result = store.patch(
                rtype, route.namespace, route.name, ctype, body, subresource=route.subresource, opts=opts
            )
            return _json(result.obj, result.code, result.warnings)
        if verb == "delete":
            assert route.name is not None
            options = await self._delete_options(request, query)
            record.body = options or None
            result = store.delete(rtype, route.namespace, route.name, options, opts)
            return _json(result.obj, result.code, result.warnings)
        if verb == "deletecollection":
            options = await self._delete_options(request, query)
            selection = self._selection(rtype, route, query)
            items = store.delete_collection(rtype, selection, options, opts)
            return _json(
                {
                    "kind": rtype.list_kind,
                    "apiVersion": rtype.api_version,
                    "metadata": {"resourceVersion": str(store.resource_version)},
                    "items": items,
                }
            )
        raise errors.method_not_allowed()

    @staticmethod
    def _write_options(query: dict[str, str], user: str) -> WriteOptions:
        validation = query.get("fieldValidation") or "Warn"
        if validation not in ("Strict", "Warn", "Ignore"):
            raise errors.bad_request(
                f'fieldValidation: Unsupported value: "{validation}": supported values:'
                ' "Ignore", "Strict", "Warn"'
            )
        dry_run = query.get("dryRun", "")
        if dry_run not in ("", "All"):
            raise errors.bad_request(f'dryRun: Unsupported value: "{dry_run}"')
        return WriteOptions(
            dry_run=dry_run == "All",
            field_validation=validation,
            field_manager=query.get("fieldManager"),
            force=query.get("force", "").lower() in _TRUE,
            user=user,
        )

    @staticmethod
    async def _body(request: web.Request, accepted: tuple[str, ...]) -> Any:
        ctype = _media_type(request)
        if ctype and ctype not in accepted:
            raise errors.unsupported_media_type(ctype, list(accepted))
        raw = await request.read()
        if not raw:
            raise errors.bad_request("the request body is empty")
        try:
            if ctype == PROTOBUF:
                return protobuf.decode(raw)
            if ctype in ("application/yaml", APPLY):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except protobuf.ProtobufError as exc:
            raise errors.unsupported_media_type(ctype, [*_BODY_TYPES[:2], f"{PROTOBUF} ({exc})"]) from exc
        except (ValueError, yaml.YAMLError) as exc:
            raise errors.bad_request(f"the request body could not be decoded: {exc}") from exc

    @staticmethod
    async def _delete_options(request: web.Request, query: dict[str, str]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        raw = await request.read()
        if raw.strip():
            try:
                decoded = json.loads(raw)
            except ValueError as exc:
                raise errors.bad_request(f"the DeleteOptions could not be decoded: {exc}") from exc
            if isinstance(decoded, dict):
                options.update(decoded)
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "gracePeriodSeconds" in query:
            options["gracePeriodSeconds"] = query["gracePeriodSeconds"]
        policy = options.get("propagationPolicy")
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise errors.bad_request(f'propagationPolicy: Unsupported value: "{policy}"')
        return options

    @staticmethod
    def _selection(rtype: ResourceType, route: Route, query: dict[str, str]) -> Selection:
        return Selection(
            namespace=route.namespace,
            labels=tuple(parse_label_selector(query.get("labelSelector"))),
            fields=tuple(parse_field_selector(query.get("fieldSelector"), rtype.field_labels)),
        )

    # --- list ----------------------------------------------------------------------------------

    def _list(
        self, request: web.Request, route: Route, rtype: ResourceType, query: dict[str, str]
    ) -> web.Response:
        selection = self._selection(rtype, route, query)
        try:
            limit = int(query["limit"]) if query.get("limit") else None
        except ValueError as exc:
            raise errors.bad_request(f"limit: Invalid value: {query['limit']!r}") from exc
        items, rv, token, remaining = self.store.list_objects(
            rtype, selection, limit=limit, continue_token=query.get("continue") or None
        )
        if tables.wants_table(request.headers.get("Accept", "")):
            return _json(
                tables.table(
                    rtype,
                    items,
                    resource_version=rv,
                    continue_token=token,
                    include_object=query.get("includeObject", "Metadata"),
                )
            )
        meta: dict[str, Any] = {"resourceVersion": rv}
        if token:
            meta["continue"] = token
            meta["remainingItemCount"] = remaining
        return _json(
            {"kind": rtype.list_kind, "apiVersion": rtype.api_version, "metadata": meta, "items": items}
        )

    # --- watch ---------------------------------------------------------------------------------

    async def _watch(
        self, request: web.Request, route: Route, rtype: ResourceType, record: RecordedRequest
    ) -> web.StreamResponse:
        query = record.query
        selection = self._selection(rtype, route, query)
        if route.name is not None:  # legacy /watch/.../NAME: a watch of one object
            selection = Selection(
                selection.namespace,
                selection.labels,
                (*selection.fields, *parse_field_selector(f"metadata.name={route.name}", rtype.field_labels)),
            )
        raw_rv = query.get("resourceVersion", "")
        try:
            since = int(raw_rv) if raw_rv not in ("", "0") else None
        except ValueError as exc:
            raise errors.bad_request(f'resourceVersion: Invalid value: "{raw_rv}"') from exc
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        except ValueError as exc:
            raise errors.bad_request("timeoutSeconds: Invalid value") from exc
        bookmarks = query.get("allowWatchBookmarks", "").lower() in _TRUE
        send_initial = query.get("sendInitialEvents", "").lower() in _TRUE
        as_table = tables.wants_table(request.headers.get("Accept", ""))
        include_object = query.get("includeObject", "Metadata")

        response = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        record.status = 200  # the stream may end by the client hanging up: record it now

        store = self.store
        hub = self.server.hub
        key = rtype.storage_key
        first = True

        def encode(kind: str, obj: dict[str, Any]) -> bytes:
            nonlocal first
            payload = rtype.serve(obj)
            if as_table:
                payload = tables.table(
                    rtype,
                    [payload],
                    resource_version=payload["metadata"]["resourceVersion"],
                    include_object=include_object,
                    with_columns=first,
                )
                first = False
            return (json.dumps({"type": kind, "object": payload}) + "\n").encode()

        def bookmark(extra: dict[str, str] | None = None, rv: int | None = None) -> bytes:
            meta: dict[str, Any] = {"resourceVersion": str(rv or store.resource_version)}
            if extra:
                meta["annotations"] = extra
            obj: dict[str, Any] = {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta}
            if as_table:
                obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "rows": []}
            return (json.dumps({"type": "BOOKMARK", "object": obj}) + "\n").encode()

        # From here to subscribe() nothing awaits: the replayed history and the live queue
        # meet exactly at the current resourceVersion.
        initial: list[bytes] = []
        try:
            if since is None or send_initial:
                for stored in store.iter_stored(key):
                    if selection.matches(stored):
                        initial.append(encode("ADDED", stored))
            if since is not None and not send_initial:
                for change in hub.since(key, since, store.resource_version):
                    event = event_for(change, selection)
                    if event is not None:
                        initial.append(encode(*event))
        except APIError as exc:
            await response.write((json.dumps({"type": "ERROR", "object": exc.status()}) + "\n").encode())
            await response.write_eof()
            return response
        sub = hub.subscribe(key)
        start_rv = store.resource_version
        try:
            for chunk in initial:
                await response.write(chunk)
            if send_initial and bookmarks:
                await response.write(bookmark({"k8s.io/initial-events-end": "true"}, start_rv))
            await self._pump(
                response,
                sub,
                selection=selection,
                encode=encode,
                bookmark=bookmark,
                timeout=timeout,
                bookmarks=bookmarks,
            )
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        finally:
            hub.unsubscribe(sub)
        with contextlib.suppress(ConnectionResetError, ConnectionError):
            await response.write_eof()
        return response

    async def _pump(
        self,
        response: web.StreamResponse,
        sub: Any,
        *,
        selection: Selection,
        encode: Any,
        bookmark: Any,
        timeout: float | None,
        bookmarks: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        interval = self.server.bookmark_interval
        next_bookmark = loop.time() + interval
        while True:
            now = loop.time()
            waits = [next_bookmark - now] if bookmarks else []
            if deadline is not None:
                waits.append(deadline - now)
            wait = max(0.0, min(waits)) if waits else None
            try:
                change: Change | None = await asyncio.wait_for(sub.queue.get(), wait)
            except TimeoutError:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    if bookmarks:  # as a real server does shortly before a watch times out
                        await response.write(bookmark())
                    return
                if bookmarks and now >= next_bookmark:
                    await response.write(bookmark())
                    next_bookmark = now + interval
                continue
            if change is None:
                return  # closed by the server: stop(), expire_watches(), CRD deleted
            event = event_for(change, selection)
            if event is not None:
                await response.write(encode(*event))


def _media_type(request: web.Request) -> str:
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower()
