"""Discovery and OpenAPI documents, derived from the registry on every request.

Owns ``/version``, ``/api`` (core reported as ``v1``), ``/apis``, ``/apis/GROUP``, the
``APIResourceList`` of each group-version (with ``xxx/status`` entries, verbs, short names,
categories), and OpenAPI v3 (``/openapi/v3`` index and per-group-version documents).

The OpenAPI v3 documents carry what kubectl 1.32 reads from them:

* each PATCH operation is tagged with ``x-kubernetes-group-version-kind`` and lists the
  ``fieldValidation`` query parameter, so ``kubectl apply`` (default ``--validate=strict``) leaves
  validation to the server instead of downloading OpenAPI v2 (which is not served: kubectl asks
  for it in protobuf); the server then honours ``fieldValidation=Strict`` for custom resources;
* custom resources' PATCH request bodies list merge/JSON/apply patches but not strategic merge,
  exactly as a real server does, so ``kubectl apply`` sends JSON merge patches for them;
* component schemas (the CRD's ``openAPIV3Schema`` with ``x-kubernetes-group-version-kind``) so
  ``kubectl explain`` works for custom resources.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from testapiserver.resources import Registry, ResourceType, version_priority

VERSION_INFO = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-testapiserver",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}

OBJECT_META_REF = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_OBJECT_META_SCHEMA: dict[str, Any] = {
    "description": "ObjectMeta is metadata that all persisted resources must have.",
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": {"type": "string", "format": "date-time"},
        "deletionTimestamp": {"type": "string", "format": "date-time"},
        "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "ownerReferences": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
        "managedFields": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    },
}


def api_versions(host: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
    }


def _group_entry(registry: Registry, group: str) -> dict[str, Any]:
    versions = registry.versions_of(group)
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(registry: Registry) -> dict[str, Any]:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group_entry(registry, g) for g in registry.groups()],
    }


def api_group(registry: Registry, group: str) -> dict[str, Any] | None:
    if group not in registry.groups():
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_entry(registry, group)}


def api_resource_list(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    types = registry.in_group_version(group, version)
    if not types:
        return None
    resources: list[dict[str, Any]] = []
    for rtype in types:
        entry: dict[str, Any] = {
            "name": rtype.plural,
            "singularName": rtype.singular,
            "namespaced": rtype.namespaced,
            "kind": rtype.kind,
            "verbs": list(rtype.verbs),
            "storageVersionHash": hashlib.sha256(
                f"{rtype.group}/{rtype.storage_version}/{rtype.kind}".encode()
            ).hexdigest()[:12],
        }
        if rtype.short_names:
            entry["shortNames"] = list(rtype.short_names)
        if rtype.categories:
            entry["categories"] = list(rtype.categories)
        resources.append(entry)
        for sub in sorted(rtype.subresources):
            resources.append(
                {
                    "name": f"{rtype.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rtype.namespaced,
                    "kind": rtype.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


# --- OpenAPI v3 ----------------------------------------------------------------------------------


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def schema_name(rtype: ResourceType) -> str:
    if not rtype.group:
        return f"io.k8s.api.core.v1.{rtype.kind}"
    reversed_group = ".".join(reversed(rtype.group.split(".")))
    return f"{reversed_group}.{rtype.version}.{rtype.kind}"


def _gvk(rtype: ResourceType) -> dict[str, str]:
    return {"group": rtype.group, "version": rtype.version, "kind": rtype.kind}


def _param(name: str, where: str = "query", required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required,
        "schema": {"type": "string"},
        "uniqueItems": True,
    }


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(
    rtype: ResourceType,
    action: str,
    op_id: str,
    *,
    body_types: list[str] | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": op_id,
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(rtype),
        "parameters": params or [],
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": _ref(schema_name(rtype))}},
            }
        },
    }
    if body_types:
        op["requestBody"] = {
            "content": {t: {"schema": _ref(schema_name(rtype))} for t in body_types},
            "required": True,
        }
    return op


def _paths_for(rtype: ResourceType) -> dict[str, Any]:
    base = "/" + _gv_path(rtype.group, rtype.version)
    scope = f"{base}/namespaces/{{namespace}}" if rtype.namespaced else base
    name_params = [_param("name", "path", True)] + (
        [_param("namespace", "path", True)] if rtype.namespaced else []
    )
    collection_params = [_param("namespace", "path", True)] if rtype.namespaced else []
    write_params = [_param("dryRun"), _param("fieldManager"), _param("fieldValidation")]
    patch_types = [
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/apply-patch+yaml",
    ]
    if not rtype.custom:
        patch_types.append("application/strategic-merge-patch+json")
    kind = rtype.kind
    paths: dict[str, Any] = {
        f"{scope}/{rtype.plural}": {
            "get": _operation(rtype, "list", f"list{kind}", params=collection_params),
            "post": _operation(
                rtype,
                "post",
                f"create{kind}",
                body_types=["application/json"],
                params=collection_params + write_params,
            ),
            "delete": _operation(
                rtype, "deletecollection", f"deletecollection{kind}", params=collection_params
            ),
        },
        f"{scope}/{rtype.plural}/{{name}}": {
            "get": _operation(rtype, "get", f"read{kind}", params=name_params),
            "put": _operation(
                rtype,
                "put",
                f"replace{kind}",
                body_types=["application/json"],
                params=name_params + write_params,
            ),
            "patch": _operation(
                rtype,
                "patch",
                f"patch{kind}",
                body_types=patch_types,
                params=[*name_params, *write_params, _param("force")],
            ),
            "delete": _operation(rtype, "delete", f"delete{kind}", params=name_params),
        },
    }
    if rtype.namespaced:
        paths[f"{base}/{rtype.plural}"] = {"get": _operation(rtype, "list", f"list{kind}ForAllNamespaces")}
    for sub in sorted(rtype.subresources):
        paths[f"{scope}/{rtype.plural}/{{name}}/{sub}"] = {
            "get": _operation(rtype, "get", f"read{kind}Status", params=name_params),
            "put": _operation(
                rtype,
                "put",
                f"replace{kind}Status",
                body_types=["application/json"],
                params=name_params + write_params,
            ),
            "patch": _operation(
                rtype,
                "patch",
                f"patch{kind}Status",
                body_types=patch_types,
                params=[*name_params, *write_params, _param("force")],
            ),
        }
    return paths


def _component(rtype: ResourceType) -> dict[str, Any]:
    if rtype.schema is not None:
        schema = copy.deepcopy(rtype.schema.raw)
    else:
        schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {
        "type": "string",
        "description": "APIVersion defines the versioned schema of this representation of an object.",
    }
    props["kind"] = {
        "type": "string",
        "description": "Kind is a string value representing the REST resource this object represents.",
    }
    props["metadata"] = {
        "allOf": [_ref(OBJECT_META_REF)],
        "default": {},
        "description": "Standard object's metadata.",
    }
    schema["x-kubernetes-group-version-kind"] = [_gvk(rtype)]
    return schema


def openapi_v3_document(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    types = registry.in_group_version(group, version)
    if not types:
        return None
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {OBJECT_META_REF: copy.deepcopy(_OBJECT_META_SCHEMA)}
    for rtype in types:
        paths.update(_paths_for(rtype))
        schemas[schema_name(rtype)] = _component(rtype)
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": VERSION_INFO["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _hash(doc: dict[str, Any]) -> str:
    return hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest().upper()


def openapi_v3_index(registry: Registry) -> dict[str, Any]:
    gvs = {(t.group, t.version) for t in registry.all()}
    paths: dict[str, Any] = {}
    for group, version in sorted(gvs, key=lambda gv: (gv[0], version_priority(gv[1]))):
        doc = openapi_v3_document(registry, group, version)
        if doc is not None:
            path = _gv_path(group, version)
            paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={_hash(doc)}"}
    return {"paths": paths}
