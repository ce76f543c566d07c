"""The object store and its bookkeeping: what a real API server does to objects on every verb.

Owns the stored objects and everything the server (not the client) decides about them:

* ``resourceVersion`` (one cluster-wide counter, bumped only by real changes: a no-op write keeps
  the old version and emits no event), ``uid``, ``creationTimestamp``, ``generation`` (bumped on
  changes outside ``metadata`` -- and outside ``status`` when the status subresource exists),
  ``generateName``;
* optimistic concurrency (409 on a stale ``metadata.resourceVersion``, uid preconditions),
  the status-subresource split, immutable metadata, "no new finalizers while deleting";
* admission of custom resources via their schema (prune/default/validate, CEL; 422 Invalid);
* deletion: ``deletionTimestamp`` while finalizers remain, removal when the last one goes;
* the built-in controllers a cluster would run: namespace termination (content deleted, then the
  namespace), CRD establishment and cleanup (types registered/unregistered, CRs deleted first),
  and ownerReference garbage collection (background and orphan; foreground acts as background).

All methods are synchronous and run on the server's loop; changes are published to the watch hub
in the same step.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from testapiserver import errors
from testapiserver.errors import APIError, Cause
from testapiserver.patching import PatchError, apply_merge, json_patch, merge_patch
from testapiserver.resources import Registry, ResourceType, StorageKey, crd_causes, types_from_crd
from testapiserver.schema import validate_object_meta
from testapiserver.selectors import Selection
from testapiserver.watch import Change, WatchHub

NS_KEY: StorageKey = ("", "namespaces")
CRD_KEY: StorageKey = ("apiextensions.k8s.io", "customresourcedefinitions")
CRD_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's generateName alphabet
_SERVER_META = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "name",
    "namespace",
)

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class WriteOptions:
    dry_run: bool = False
    field_validation: str = "Warn"  # Strict | Warn | Ignore (a real server's default is Warn)
    field_manager: str | None = None
    force: bool = False
    user: str = "system"


@dataclass
class Result:
    obj: dict[str, Any]
    code: int = 200
    warnings: list[str] = field(default_factory=list)


ObjKey = tuple[str, str]  # (namespace or "", name)


class Store:
    def __init__(self, registry: Registry, hub: WatchHub) -> None:
        self.registry = registry
        self.hub = hub
        self._rv = 0
        self._data: dict[StorageKey, dict[ObjKey, dict[str, Any]]] = {}
        self._applied: dict[tuple[StorageKey, str, str, str, str], Any] = {}  # SSA: last applied
        self._dirty = False  # something was removed or started terminating: run controllers
        self._reconciling = False

    # --- basics --------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def bump(self) -> int:
        """Advance the counter without a change (used when expiring watch history)."""
        return self._next_rv()

    def _bucket(self, key: StorageKey) -> dict[ObjKey, dict[str, Any]]:
        return self._data.setdefault(key, {})

    def _stored(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._bucket(rtype.storage_key).get((namespace or "", name))

    def iter_stored(self, key: StorageKey) -> Iterator[dict[str, Any]]:
        for okey in sorted(self._bucket(key)):
            yield self._bucket(key)[okey]

    def _publish(self, kind: str, key: StorageKey, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self.hub.publish(
            Change(
                kind,
                int(obj["metadata"]["resourceVersion"]),
                key,
                copy.deepcopy(obj),
                copy.deepcopy(old) if old else None,
            )
        )

    # --- reads ---------------------------------------------------------------------------------

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        stored = self._stored(rtype, namespace, name)
        if stored is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        return rtype.serve(stored)

    def list_objects(
        self,
        rtype: ResourceType,
        selection: Selection,
        *,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> tuple[list[dict[str, Any]], str, str | None, int | None]:
        """Matching objects (served shape), the list rv, a continue token, remaining count."""
        list_rv = str(self._rv)
        start: tuple[str, str] | None = None
        if continue_token:
            try:
                token = json.loads(base64.urlsafe_b64decode(continue_token.encode()))
                list_rv, start = str(token["rv"]), (token["start"][0], token["start"][1])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise errors.bad_request("continue key is not valid") from exc
        bucket = self._bucket(rtype.storage_key)
        keys = [k for k in sorted(bucket) if start is None or k > start]
        matching = [k for k in keys if selection.matches(bucket[k])]
        next_token: str | None = None
        remaining: int | None = None
        if limit and len(matching) > limit:
            last = matching[limit - 1]
            remaining = len(matching) - limit
            matching = matching[:limit]
            raw = json.dumps({"rv": list_rv, "start": list(last)}).encode()
            next_token = base64.urlsafe_b64encode(raw).decode()
        return [rtype.serve(bucket[k]) for k in matching], list_rv, next_token, remaining

    def namespace_exists(self, name: str) -> bool:
        return ("", name) in self._bucket(NS_KEY)

    # --- create --------------------------------------------------------------------------------

    def create(self, rtype: ResourceType, namespace: str | None, body: Any, opts: WriteOptions) -> Result:
        if not isinstance(body, dict):
            raise errors.bad_request("the request body must be a JSON object")
        obj = copy.deepcopy(body)
        self._check_type(rtype, obj)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        namespace = self._check_namespace(rtype, namespace, meta)
        if meta.get("resourceVersion"):
            raise errors.bad_request("resourceVersion should not be set on objects to be created")
        for key in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
            "selfLink",
        ):
            meta.pop(key, None)
        name = meta.get("name")
        if not name and not meta.get("generateName"):
            raise errors.invalid(
                rtype.group,
                rtype.kind,
                "",
                [
                    Cause(
                        "metadata.name",
                        "Required value: name or generateName is required",
                        "FieldValueRequired",
                    )
                ],
            )
        if not name:
            name = self._generate_name(rtype, namespace, str(meta["generateName"]))
            meta["name"] = name
        if namespace is not None and rtype.storage_key != NS_KEY:
            ns_obj = self._bucket(NS_KEY).get(("", namespace))
            if ns_obj is None:
                raise errors.not_found("", "namespaces", namespace)
            if ns_obj["metadata"].get("deletionTimestamp"):
                raise errors.forbidden(
                    rtype.group,
                    rtype.plural,
                    name,
                    f"unable to create new content in namespace {namespace} because it is being terminated",
                )
        if rtype.custom and self._crd_terminating(rtype):
            raise errors.method_not_allowed(
                "create not allowed while custom resource definition is terminating"
            )
        if "status" in rtype.subresources and rtype.custom:
            obj.pop("status", None)  # a real server ignores status on create (status subresource)
        self._on_create_builtin(rtype, obj)
        stored = rtype.store(obj)
        warnings = self._admit(rtype, stored, None, opts)
        if self._stored(rtype, namespace, name) is not None:
            raise errors.already_exists(rtype.group, rtype.plural, name)
        smeta = stored["metadata"]
        smeta["uid"] = str(uuid.uuid4())
        smeta["creationTimestamp"] = now_iso()
        if rtype.has_generation:
            smeta["generation"] = 1
        if opts.dry_run:
            return Result(rtype.serve(stored), 201, warnings)
        smeta["resourceVersion"] = str(self._next_rv())
        stored = _ordered(stored)
        self._bucket(rtype.storage_key)[(namespace or "", name)] = stored
        self._publish("ADDED", rtype.storage_key, stored, None)
        if smeta.get("ownerReferences"):
            self._dirty = True  # the garbage collector deletes dependents of absent owners
        if rtype.storage_key == CRD_KEY:
            self._register_crd(stored)
        self._reconcile()
        return Result(rtype.serve(stored), 201, warnings)

    def _generate_name(self, rtype: ResourceType, namespace: str | None, prefix: str) -> str:
        # A real server answers 409 on the (rare) collision and clients retry; retrying here
        # keeps two Events with the same generateName from ever colliding in tests.
        for _ in range(16):
            name = prefix + "".join(random.choices(_SUFFIX_ALPHABET, k=5))
            if self._stored(rtype, namespace, name) is None:
                return name
        raise errors.already_exists(rtype.group, rtype.plural, prefix)

    def _check_type(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        kind = obj.get("kind")
        api_version = obj.get("apiVersion")
        if kind and kind != rtype.kind:
            raise errors.bad_request(
                f"the kind of the object ({kind}) does not match the kind of the resource ({rtype.kind})"
            )
        if api_version and api_version != rtype.api_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API"
                f" version ({rtype.api_version})"
            )

    def _check_namespace(
        self, rtype: ResourceType, namespace: str | None, meta: dict[str, Any]
    ) -> str | None:
        if not rtype.namespaced:
            meta.pop("namespace", None)
            return None
        body_ns = meta.get("namespace")
        if body_ns and namespace and body_ns != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        namespace = namespace or body_ns
        if not namespace:
            raise errors.bad_request("the namespace of the object is required")
        meta["namespace"] = namespace
        return str(namespace)

    def _on_create_builtin(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        if rtype.storage_key == NS_KEY:
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
        elif rtype.storage_key == CRD_KEY:
            causes = crd_causes(obj)
            if causes:
                raise errors.invalid(rtype.group, rtype.kind, obj["metadata"].get("name", ""), causes)
            finalizers = obj["metadata"].setdefault("finalizers", [])
            if CRD_FINALIZER not in finalizers:
                finalizers.append(CRD_FINALIZER)
            obj["status"] = _crd_status(obj, None)

    # --- admission -----------------------------------------------------------------------------

    def _admit(
        self, rtype: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, opts: WriteOptions
    ) -> list[str]:
        """Schema pruning/defaulting/validation, CEL, metadata checks; 422 on failure."""
        warnings: list[str] = []
        name = obj["metadata"].get("name", "")
        causes = validate_object_meta(obj["metadata"], dns_label=rtype.dns_label_names)
        if rtype.schema is not None:
            unknown = rtype.schema.prune(obj)
            if unknown and opts.field_validation == "Strict":
                raise errors.bad_request(
                    "strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown)
                )
            if unknown and opts.field_validation != "Ignore":
                warnings += [f'unknown field "{u}"' for u in unknown]
            rtype.schema.apply_defaults(obj)
            causes += rtype.schema.validate(obj)
        if rtype.rules is not None and not rtype.rules.empty and not causes:
            causes += rtype.rules.evaluate(obj, old)
        if causes:
            raise errors.invalid(rtype.group, rtype.kind, name, causes)
        return warnings

    # --- update (PUT) and patch ----------------------------------------------------------------

    def replace(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None,
        opts: WriteOptions,
    ) -> Result:
        if not isinstance(body, dict):
            raise errors.bad_request("the request body must be a JSON object")
        # Custom resources cannot be updated unconditionally (AllowUnconditionalUpdate: false).
        return self._update(
            rtype, namespace, name, body, subresource=subresource, opts=opts, require_rv=rtype.custom
        )

    def patch(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        patch_type: str,
        patch: Any,
        *,
        subresource: str | None,
        opts: WriteOptions,
    ) -> Result:
        if patch_type == APPLY:
            return self._apply(rtype, namespace, name, patch, subresource=subresource, opts=opts)
        stored = self._stored(rtype, namespace, name)
        if stored is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        current = rtype.serve(stored)
        if patch_type == MERGE or (patch_type == STRATEGIC and not rtype.custom):
            # Strategic merge on built-ins is approximated by a merge patch (no patchMergeKey
            # list merging); custom resources reject it below, as a real server does.
            if not isinstance(patch, dict):
                raise errors.bad_request("a merge patch must be a JSON object")
            patched = merge_patch(current, patch)
        elif patch_type == JSON_PATCH:
            try:
                patched = json_patch(current, patch)
            except PatchError as exc:
                raise errors.unprocessable(
                    f"the server rejected our request due to an error in our request: {exc}"
                ) from exc
        else:
            raise errors.unsupported_media_type(patch_type, [JSON_PATCH, MERGE, APPLY])
        if not isinstance(patched, dict):
            raise errors.unprocessable("the patched object is not a JSON object")
        return self._update(
            rtype, namespace, name, patched, subresource=subresource, opts=opts, require_rv=False
        )

    def _apply(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None,
        opts: WriteOptions,
    ) -> Result:
        if not opts.field_manager:
            raise errors.bad_request("PATCH requests with apply content type require fieldManager")
        if not isinstance(body, dict):
            raise errors.bad_request("an apply patch must be a YAML/JSON object")
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        if meta.get("name") not in (None, name):
            raise errors.bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        meta["name"] = name
        if not body.get("apiVersion") or not body.get("kind"):
            raise errors.invalid(
                rtype.group,
                rtype.kind,
                name,
                [
                    Cause(
                        "apiVersion" if not body.get("apiVersion") else "kind",
                        "Required value",
                        "FieldValueRequired",
                    )
                ],
            )
        akey = (rtype.storage_key, namespace or "", name, opts.field_manager, subresource or "")
        stored = self._stored(rtype, namespace, name)
        if stored is None:
            if subresource:
                raise errors.not_found(rtype.group, rtype.plural, name)
            result = self.create(rtype, namespace, body, opts)
            if not opts.dry_run:
                self._applied[akey] = body
            return result
        current = rtype.serve(stored)
        schema = _apply_schema(rtype)
        merged = apply_merge(current, body, self._applied.get(akey), schema)
        if not body["metadata"].get("resourceVersion"):
            merged["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
        result = self._update(
            rtype, namespace, name, merged, subresource=subresource, opts=opts, require_rv=False
        )
        if not opts.dry_run:
            self._applied[akey] = body
        return result

    def _update(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        candidate: dict[str, Any],
        *,
        subresource: str | None,
        opts: WriteOptions,
        require_rv: bool,
    ) -> Result:
        old = self._stored(rtype, namespace, name)
        if old is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        candidate = copy.deepcopy(candidate)
        self._check_type(rtype, candidate)
        cmeta = candidate.get("metadata")
        if not isinstance(cmeta, dict):
            cmeta = candidate["metadata"] = {}
        if cmeta.get("name") not in (None, name):
            raise errors.bad_request(
                f"the name of the object ({cmeta.get('name')}) does not match the name on the URL ({name})"
            )
        if rtype.namespaced and cmeta.get("namespace") not in (None, namespace):
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        ometa = old["metadata"]
        wanted_rv = cmeta.get("resourceVersion")
        if require_rv and not wanted_rv:
            raise errors.invalid(
                rtype.group,
                rtype.kind,
                name,
                [Cause("metadata.resourceVersion", "Invalid value: 0x0: must be specified for an update")],
            )
        if wanted_rv and str(wanted_rv) != ometa["resourceVersion"]:
            raise errors.conflict(rtype.group, rtype.plural, name)
        if cmeta.get("uid") and cmeta["uid"] != ometa["uid"]:
            raise errors.conflict(
                rtype.group,
                rtype.plural,
                name,
                f"Precondition failed: UID in precondition: {cmeta['uid']},"
                f" UID in object meta: {ometa['uid']}",
            )
        new = rtype.store(candidate)
        if subresource == "status":
            # Status writes change only .status: everything else comes from the stored object.
            base = copy.deepcopy(old)
            if "status" in new:
                base["status"] = new["status"]
            else:
                base.pop("status", None)
            new = base
        elif "status" in rtype.subresources:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        nmeta = new["metadata"]
        for key in _SERVER_META:
            if key in ometa:
                nmeta[key] = copy.deepcopy(ometa[key])
            else:
                nmeta.pop(key, None)
        nmeta.pop("managedFields", None)
        nmeta.pop("selfLink", None)
        nmeta["resourceVersion"] = ometa["resourceVersion"]
        if ometa.get("deletionTimestamp"):
            added = [f for f in nmeta.get("finalizers") or [] if f not in (ometa.get("finalizers") or [])]
            if added:
                raise errors.invalid(
                    rtype.group,
                    rtype.kind,
                    name,
                    [
                        Cause(
                            "metadata.finalizers",
                            "Forbidden: no new finalizers can be added if the"
                            f" object is being deleted, found new finalizers {added!r}",
                            "FieldValueForbidden",
                        )
                    ],
                )
        if rtype.storage_key == CRD_KEY:
            self._on_update_crd(rtype, old, new)
        warnings = self._admit(rtype, new, old, opts)
        if rtype.has_generation and _spec_changed(old, new, "status" in rtype.subresources):
            nmeta["generation"] = int(ometa.get("generation", 0)) + 1
        if _same(old, new):
            return Result(rtype.serve(old), 200, warnings)  # no-op: no new rv, no event
        if opts.dry_run:
            return Result(rtype.serve(new), 200, warnings)
        new = _ordered(new)
        if nmeta.get("deletionTimestamp") and not nmeta.get("finalizers"):
            self._remove(rtype.storage_key, new)
            self._reconcile()
            return Result(rtype.serve(new), 200, warnings)
        nmeta["resourceVersion"] = str(self._next_rv())
        self._bucket(rtype.storage_key)[(namespace or "", name)] = new
        self._publish("MODIFIED", rtype.storage_key, new, old)
        if rtype.storage_key == CRD_KEY:
            self._register_crd(new)
        self._reconcile()
        return Result(rtype.serve(new), 200, warnings)

    # --- delete --------------------------------------------------------------------------------

    def delete(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        options: dict[str, Any],
        opts: WriteOptions,
    ) -> Result:
        stored = self._stored(rtype, namespace, name)
        if stored is None:
            raise errors.not_found(rtype.group, rtype.plural, name)
        pre = options.get("preconditions") or {}
        meta = stored["metadata"]
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise errors.conflict(
                rtype.group,
                rtype.plural,
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}",
            )
        if pre.get("resourceVersion") and str(pre["resourceVersion"]) != meta["resourceVersion"]:
            raise errors.conflict(
                rtype.group,
                rtype.plural,
                name,
                "Precondition failed: ResourceVersion in precondition:"
                f" {pre['resourceVersion']}, ResourceVersion in object meta:"
                f" {meta['resourceVersion']}",
            )
        if opts.dry_run:
            return Result(rtype.serve(stored))
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is True:
            policy = "Orphan"
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        result = self._delete_stored(rtype.storage_key, stored)
        self._reconcile()
        if result is None:
            details = {"name": name, "kind": rtype.plural, "uid": meta["uid"]}
            if rtype.group:
                details["group"] = rtype.group
            return Result(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": details,
                }
            )
        return Result(rtype.serve(result))

    def delete_collection(
        self, rtype: ResourceType, selection: Selection, options: dict[str, Any], opts: WriteOptions
    ) -> list[dict[str, Any]]:
        items, _, _, _ = self.list_objects(rtype, selection)
        out = []
        for item in items:
            meta = item["metadata"]
            out.append(self.delete(rtype, meta.get("namespace"), meta["name"], options, opts).obj)
        return out

    def _delete_stored(self, key: StorageKey, stored: dict[str, Any]) -> dict[str, Any] | None:
        """Mark for deletion (finalizers/namespaces) or remove; the marked object, or None."""
        meta = stored["metadata"]
        if meta.get("deletionTimestamp"):
            return stored  # already terminating: nothing changes
        is_ns = key == NS_KEY
        if not meta.get("finalizers") and not is_ns:
            self._remove(key, stored)
            return None
        new = copy.deepcopy(stored)
        nmeta = new["metadata"]
        nmeta["deletionTimestamp"] = now_iso()
        nmeta["deletionGracePeriodSeconds"] = 0
        if "generation" in nmeta:  # as markAsDeleting does for resources without graceful delete
            nmeta["generation"] = int(nmeta["generation"]) + 1
        if is_ns:
            new["status"] = {"phase": "Terminating"}
        nmeta["resourceVersion"] = str(self._next_rv())
        self._bucket(key)[(meta.get("namespace") or "", meta["name"])] = new
        self._publish("MODIFIED", key, new, stored)
        self._dirty = True
        return new

    def _remove(self, key: StorageKey, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        okey = (meta.get("namespace") or "", meta["name"])
        old = self._bucket(key).pop(okey, None)
        meta["resourceVersion"] = str(self._next_rv())
        self._publish("DELETED", key, obj, old)
        for akey in [a for a in self._applied if a[:3] == (key, okey[0], okey[1])]:
            del self._applied[akey]
        if key == CRD_KEY:
            self._unregister_crd(obj)
        self._dirty = True

    # --- built-in controllers ------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Run namespace, CRD-cleanup and garbage-collection passes until nothing changes."""
        if self._reconciling:
            return
        self._reconciling = True
        try:
            for _ in range(1000):
                if not self._dirty:
                    break
                self._dirty = False
                self._namespace_pass()
                self._crd_cleanup_pass()
                self._gc_pass()
        finally:
            self._reconciling = False

    def _namespace_pass(self) -> None:
        for ns_obj in list(self._bucket(NS_KEY).values()):
            if not ns_obj["metadata"].get("deletionTimestamp"):
                continue
            ns = ns_obj["metadata"]["name"]
            remaining = 0
            for key, bucket in list(self._data.items()):
                for (obj_ns, _), obj in list(bucket.items()):
                    if obj_ns != ns or key == NS_KEY:
                        continue
                    remaining += 1
                    self._delete_stored(key, obj)
            if remaining == 0 and not ns_obj["metadata"].get("finalizers"):
                self._remove(NS_KEY, copy.deepcopy(ns_obj))

    def _crd_cleanup_pass(self) -> None:
        for crd in list(self._bucket(CRD_KEY).values()):
            meta = crd["metadata"]
            if not meta.get("deletionTimestamp") or CRD_FINALIZER not in (meta.get("finalizers") or []):
                continue
            key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
            objs = list(self._bucket(key).values())
            for obj in objs:
                self._delete_stored(key, obj)
            if not self._bucket(key):
                new = copy.deepcopy(crd)
                new["metadata"]["finalizers"] = [f for f in meta["finalizers"] if f != CRD_FINALIZER]
                if new["metadata"]["finalizers"]:
                    new["metadata"]["resourceVersion"] = str(self._next_rv())
                    self._bucket(CRD_KEY)[("", meta["name"])] = new
                    self._publish("MODIFIED", CRD_KEY, new, crd)
                else:
                    self._remove(CRD_KEY, new)

    def _gc_pass(self) -> None:
        uids = {obj["metadata"]["uid"] for bucket in self._data.values() for obj in bucket.values()}
        for key, bucket in list(self._data.items()):
            for obj in list(bucket.values()):
                refs = obj["metadata"].get("ownerReferences") or []
                owner_uids = {r.get("uid") for r in refs if isinstance(r, dict)}
                if owner_uids and not owner_uids & uids:
                    self._delete_stored(key, obj)

    def _orphan_dependents(self, uid: str) -> None:
        for key, bucket in list(self._data.items()):
            for okey, obj in list(bucket.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(isinstance(r, dict) and r.get("uid") == uid for r in refs):
                    new = copy.deepcopy(obj)
                    new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                    if not new["metadata"]["ownerReferences"]:
                        del new["metadata"]["ownerReferences"]
                    new["metadata"]["resourceVersion"] = str(self._next_rv())
                    bucket[okey] = new
                    self._publish("MODIFIED", key, new, obj)

    # --- CRDs ----------------------------------------------------------------------------------

    def _crd_terminating(self, rtype: ResourceType) -> bool:
        crd = self._bucket(CRD_KEY).get(("", f"{rtype.plural}.{rtype.group}"))
        return bool(crd and crd["metadata"].get("deletionTimestamp"))

    def _on_update_crd(self, rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> None:
        causes = crd_causes(new)
        if old["spec"].get("scope") != new["spec"].get("scope"):
            causes.append(Cause("spec.scope", "Invalid value: field is immutable"))
        if old["spec"].get("group") != new["spec"].get("group"):
            causes.append(Cause("spec.group", "Invalid value: field is immutable"))
        if causes:
            raise errors.invalid(rtype.group, rtype.kind, new["metadata"].get("name", ""), causes)
        new["status"] = _crd_status(new, old.get("status"))

    def _register_crd(self, crd: dict[str, Any]) -> None:
        if crd["metadata"].get("deletionTimestamp"):
            return  # still served while its objects are cleaned up; no re-registration
        self.registry.register_crd(crd["metadata"]["name"], types_from_crd(crd))

    def _unregister_crd(self, crd: dict[str, Any]) -> None:
        self.registry.unregister_crd(crd["metadata"]["name"])
        key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
        self._data.pop(key, None)
        self.hub.close_key(key)

    # --- snapshots for tests -------------------------------------------------------------------

    def snapshot(self, rtype: ResourceType, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            rtype.serve(o)
            for o in self.iter_stored(rtype.storage_key)
            if namespace is None or o["metadata"].get("namespace") == namespace
        ]


def _crd_status(crd: dict[str, Any], old_status: dict[str, Any] | None) -> dict[str, Any]:
    names = crd["spec"]["names"]
    storage = next((v["name"] for v in crd["spec"].get("versions", []) if v.get("storage")), None)
    stored_versions = list((old_status or {}).get("storedVersions") or [])
    if storage and storage not in stored_versions:
        stored_versions.append(storage)
    old_conditions = {c.get("type"): c for c in (old_status or {}).get("conditions") or []}
    stamp = now_iso()
    conditions = [
        {
            "type": "NamesAccepted",
            "status": "True",
            "reason": "NoConflicts",
            "message": "no conflicts found",
            "lastTransitionTime": old_conditions.get("NamesAccepted", {}).get("lastTransitionTime", stamp),
        },
        {
            "type": "Established",
            "status": "True",
            "reason": "InitialNamesAccepted",
            "message": "the initial names have been accepted",
            "lastTransitionTime": old_conditions.get("Established", {}).get("lastTransitionTime", stamp),
        },
    ]
    accepted = {
        "plural": names["plural"],
        "singular": names.get("singular") or names["kind"].lower(),
        "kind": names["kind"],
        "listKind": names.get("listKind") or f"{names['kind']}List",
    }
    if names.get("shortNames"):
        accepted["shortNames"] = list(names["shortNames"])
    if names.get("categories"):
        accepted["categories"] = list(names["categories"])
    return {"conditions": conditions, "acceptedNames": accepted, "storedVersions": stored_versions}


def _apply_schema(rtype: ResourceType) -> dict[str, Any]:
    """The schema SSA merges with: the CRD's plus ObjectMeta's list semantics."""
    props: dict[str, Any] = {}
    if rtype.schema is not None:
        props.update(rtype.schema.raw.get("properties") or {})
    props["metadata"] = {
        "properties": {
            "finalizers": {"x-kubernetes-list-type": "set"},
            "ownerReferences": {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uid"]},
        }
    }
    return {"properties": props}


def _strip_for_compare(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out.get("metadata", {}).pop("resourceVersion", None)
    out.get("metadata", {}).pop("generation", None)
    return out


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return _strip_for_compare(old) == _strip_for_compare(new)


def _spec_changed(old: dict[str, Any], new: dict[str, Any], status_subresource: bool) -> bool:
    skip = {"metadata", "apiVersion", "kind"} | ({"status"} if status_subresource else set())
    return {k: v for k, v in old.items() if k not in skip} != {k: v for k, v in new.items() if k not in skip}


def _ordered(obj: dict[str, Any]) -> dict[str, Any]:
    head: dict[str, Any] = {k: obj[k] for k in ("apiVersion", "kind", "metadata") if k in obj}
    return {**head, **{k: v for k, v in obj.items() if k not in head}}


__all__ = ["APPLY", "JSON_PATCH", "MERGE", "STRATEGIC", "APIError", "Result", "Store", "WriteOptions"]
