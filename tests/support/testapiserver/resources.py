"""Which resources the server serves: built-in kinds, and kinds registered by CRDs.

Owns ``ResourceType`` (group/version/plural/kind/scope/verbs/subresources/schema/printer columns),
the ``Registry`` of served types (what discovery and routing consult), the translation of a
``CustomResourceDefinition`` into served types and the checks a real server makes on CRDs, and the
field conversion between ``events.k8s.io/v1`` and ``core/v1`` Events (one storage, two views).

Built-in kinds other than Namespaces, Events and CRDs are *stored only*: there is no controller
behind Pods, Nodes, DaemonSets, RBAC objects, etc.; they exist so ``kubectl apply -f deploy/``
and fixtures work, and their bodies are not validated.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from testapiserver.cel import RuleCompileError, RuleSet
from testapiserver.errors import Cause
from testapiserver.schema import StructuralSchema, name_causes

ALL_VERBS: tuple[str, ...] = (
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
)
StorageKey = tuple[str, str]  # (group, plural): one store shared by all versions of a resource


@dataclass(frozen=True)
class PrinterColumn:
    """One column of the server-side Table view (CRD ``additionalPrinterColumns`` shape)."""

    name: str
    type: str
    json_path: str = ""
    description: str = ""
    priority: int = 0
    format: str = ""
    compute: Callable[[dict[str, Any]], Any] | None = None  # for built-ins' composite cells


AGE_COLUMN = PrinterColumn("Age", "date", ".metadata.creationTimestamp", "CreationTimestamp of the object")


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    list_kind: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    subresources: frozenset[str] = frozenset()
    schema: StructuralSchema | None = None  # None: stored as sent (built-ins)
    rules: RuleSet | None = None
    printer_columns: tuple[PrinterColumn, ...] = (AGE_COLUMN,)
    has_generation: bool = False
    custom: bool = False  # served because of a CRD
    storage_version: str = ""  # the version objects are stored in (CRD storage: true)
    storage_group: str | None = None  # events.k8s.io events live in the core store
    # Conversion between the stored shape and this version's shape (identity unless set).
    to_storage: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    from_storage: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    dns_label_names: bool = False  # namespaces: names are RFC 1123 labels
    field_labels: frozenset[str] = frozenset({"metadata.name", "metadata.namespace"})

    def __post_init__(self) -> None:
        self.singular = self.singular or self.kind.lower()
        self.list_kind = self.list_kind or f"{self.kind}List"
        self.storage_version = self.storage_version or self.version

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def storage_key(self) -> StorageKey:
        group = self.storage_group if self.storage_group is not None else self.group
        return (group, self.plural)

    def serve(self, stored: dict[str, Any]) -> dict[str, Any]:
        """A deep copy of a stored object in this version's shape."""
        obj = copy.deepcopy(stored)
        if self.from_storage is not None:
            obj = self.from_storage(obj)
        obj["apiVersion"] = self.api_version
        obj["kind"] = self.kind
        # Keep apiVersion/kind/metadata first, as a real server's JSON reads.
        head: dict[str, Any] = {k: obj.pop(k) for k in ("apiVersion", "kind", "metadata") if k in obj}
        return {**head, **obj}

    def store(self, served: dict[str, Any]) -> dict[str, Any]:
        """A served-shape object converted into the stored shape (a copy)."""
        obj = copy.deepcopy(served)
        if self.to_storage is not None:
            obj = self.to_storage(obj)
        obj["apiVersion"] = (
            f"{self.storage_key[0]}/{self.storage_version}" if self.storage_key[0] else self.storage_version
        )
        return obj


class Registry:
    """The served resource types, keyed by (group, version, plural)."""

    def __init__(self) -> None:
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._crd_owned: dict[str, list[tuple[str, str, str]]] = {}  # CRD name -> its types

    def add(self, rtype: ResourceType) -> None:
        self._types[(rtype.group, rtype.version, rtype.plural)] = rtype

    def find(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        return list(self._types.values())

    def versions_of(self, group: str) -> list[str]:
        versions = {v for (g, v, _) in self._types if g == group}
        return sorted(versions, key=version_priority)

    def groups(self) -> list[str]:
        return sorted({g for (g, _, _) in self._types if g})

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return [t for (g, v, _), t in sorted(self._types.items()) if g == group and v == version]

    def for_storage(self, key: StorageKey) -> list[ResourceType]:
        return [t for t in self._types.values() if t.storage_key == key]

    def register_crd(self, crd_name: str, types: list[ResourceType]) -> None:
        self.unregister_crd(crd_name)
        for rtype in types:
            self.add(rtype)
        self._crd_owned[crd_name] = [(t.group, t.version, t.plural) for t in types]

    def unregister_crd(self, crd_name: str) -> None:
        for key in self._crd_owned.pop(crd_name, []):
            self._types.pop(key, None)


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Kubernetes version ordering: GA > beta > alpha, higher numbers first; others last."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0, version)
    major = int(match.group(1))
    stage = {"": 0, "beta": 1, "alpha": 2}[match.group(2) or ""]
    minor = int(match.group(3) or 0)
    return (stage, -major, -minor, version)


# --- CRDs --------------------------------------------------------------------------------------


def crd_causes(crd: dict[str, Any]) -> list[Cause]:
    """The checks a real server makes before accepting a CustomResourceDefinition."""
    causes: list[Cause] = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group") or ""
    plural = names.get("plural") or ""
    if not group:
        causes.append(Cause("spec.group", "Required value", "FieldValueRequired"))
    elif "." not in group:
        causes.append(
            Cause("spec.group", f'Invalid value: "{group}": should be a domain with at least one dot')
        )
    if not plural:
        causes.append(Cause("spec.names.plural", "Required value", "FieldValueRequired"))
    if not names.get("kind"):
        causes.append(Cause("spec.names.kind", "Required value", "FieldValueRequired"))
    name = (crd.get("metadata") or {}).get("name", "")
    if group and plural and name != f"{plural}.{group}":
        causes.append(
            Cause("metadata.name", f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        causes.append(
            Cause(
                "spec.scope",
                f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", "Namespaced"',
                "FieldValueNotSupported",
            )
        )
    versions = spec.get("versions") or []
    if not versions:
        causes.append(
            Cause("spec.versions", "Invalid value: must have exactly one version marked as storage version")
        )
    storage = [v for v in versions if isinstance(v, dict) and v.get("storage")]
    if versions and len(storage) != 1:
        causes.append(
            Cause("spec.versions", "Invalid value: must have exactly one version marked as storage version")
        )
    for index, version in enumerate(versions):
        where = f"spec.versions[{index}]"
        if not isinstance(version, dict) or not version.get("name"):
            causes.append(Cause(f"{where}.name", "Required value", "FieldValueRequired"))
            continue
        causes += name_causes(version["name"], dns_label=True, field=f"{where}.name")
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if not isinstance(schema, dict):
            causes.append(
                Cause(
                    f"{where}.schema.openAPIV3Schema",
                    "Required value: schemas are required",
                    "FieldValueRequired",
                )
            )
            continue
        if schema.get("type") != "object":
            causes.append(
                Cause(
                    f"{where}.schema.openAPIV3Schema.type",
                    "Required value: must be object at the root",
                    "FieldValueRequired",
                )
            )
        try:
            RuleSet(schema)
        except RuleCompileError as exc:
            causes.append(Cause(f"{where}.schema.openAPIV3Schema", f"Invalid value: {exc}"))
    return causes


def types_from_crd(crd: dict[str, Any]) -> list[ResourceType]:
    """Served types for each ``served: true`` version of an accepted CRD."""
    spec = crd["spec"]
    names = spec["names"]
    storage_version = next(v["name"] for v in spec["versions"] if v.get("storage"))
    result: list[ResourceType] = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        raw_schema = version["schema"]["openAPIV3Schema"]
        subresources = version.get("subresources") or {}
        columns = tuple(
            PrinterColumn(
                name=c["name"],
                type=c.get("type", "string"),
                json_path=c.get("jsonPath", ""),
                description=c.get("description", ""),
                priority=int(c.get("priority", 0)),
                format=c.get("format", ""),
            )
            for c in version.get("additionalPrinterColumns") or []
        ) or (AGE_COLUMN,)
        result.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                list_kind=names.get("listKind") or f"{names['kind']}List",
                namespaced=spec["scope"] == "Namespaced",
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                # Only /status is served; a declared /scale is not (see the package docs).
                subresources=frozenset({"status"} if "status" in subresources else ()),
                schema=StructuralSchema(raw_schema),
                rules=RuleSet(raw_schema),
                printer_columns=columns,
                has_generation=True,
                custom=True,
                storage_version=storage_version,
                # selectableFields (Kubernetes 1.31+): `.spec.nodeName` -> field label `spec.nodeName`.
                field_labels=frozenset(
                    {"metadata.name", "metadata.namespace"}
                    | {f["jsonPath"].lstrip(".") for f in version.get("selectableFields") or ()}
                ),
            )
        )
    return result


# --- Events: core/v1 is the storage shape; events.k8s.io/v1 is a renamed view -----------------

_EVENTS_RENAMES = {  # core/v1 name -> events.k8s.io/v1 name
    "involvedObject": "regarding",
    "message": "note",
    "source": "deprecatedSource",
    "firstTimestamp": "deprecatedFirstTimestamp",
    "lastTimestamp": "deprecatedLastTimestamp",
    "count": "deprecatedCount",
    "reportingComponent": "reportingController",
}


def _events_from_core(obj: dict[str, Any]) -> dict[str, Any]:
    return {_EVENTS_RENAMES.get(k, k): v for k, v in obj.items()}


def _events_to_core(obj: dict[str, Any]) -> dict[str, Any]:
    back = {v: k for k, v in _EVENTS_RENAMES.items()}
    return {back.get(k, k): v for k, v in obj.items()}


def _event_object(obj: dict[str, Any]) -> str:
    ref = obj.get("involvedObject") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


def _event_last_seen(obj: dict[str, Any]) -> Any:
    return (
        obj.get("lastTimestamp")
        or obj.get("eventTime")
        or (obj.get("metadata") or {}).get("creationTimestamp")
    )


_EVENT_FIELDS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    }
)


def builtin_types() -> list[ResourceType]:
    """The built-in kinds served before any CRD exists."""
    core_events_columns = (
        PrinterColumn("Last Seen", "date", compute=_event_last_seen),
        PrinterColumn("Type", "string", ".type"),
        PrinterColumn("Reason", "string", ".reason"),
        PrinterColumn("Object", "string", compute=_event_object),
        PrinterColumn("Message", "string", ".message"),
    )
    status = frozenset({"status"})
    types = [
        ResourceType(
            "",
            "v1",
            "namespaces",
            "Namespace",
            False,
            short_names=("ns",),
            verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
            subresources=status,
            dns_label_names=True,
            field_labels=frozenset({"metadata.name", "status.phase"}),
            printer_columns=(PrinterColumn("Status", "string", ".status.phase"), AGE_COLUMN),
        ),
        ResourceType(
            "",
            "v1",
            "events",
            "Event",
            True,
            short_names=("ev",),
            printer_columns=core_events_columns,
            field_labels=_EVENT_FIELDS,
        ),
        ResourceType(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            True,
            short_names=("ev",),
            storage_group="",
            storage_version="v1",
            to_storage=_events_to_core,
            from_storage=_events_from_core,
            printer_columns=core_events_columns,
            field_labels=frozenset({"metadata.name", "metadata.namespace"}),
        ),
        ResourceType("", "v1", "nodes", "Node", False, short_names=("no",), subresources=status),
        ResourceType(
            "",
            "v1",
            "pods",
            "Pod",
            True,
            short_names=("po",),
            subresources=status,
            categories=("all",),
            field_labels=frozenset({"metadata.name", "metadata.namespace", "spec.nodeName", "status.phase"}),
        ),
        ResourceType("", "v1", "configmaps", "ConfigMap", True, short_names=("cm",)),
        ResourceType("", "v1", "secrets", "Secret", True),
        ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, short_names=("sa",)),
        ResourceType(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            short_names=("crd", "crds"),
            categories=("api-extensions",),
            subresources=status,
            has_generation=True,
            printer_columns=(PrinterColumn("Created At", "date", ".metadata.creationTimestamp"),),
        ),
        ResourceType(
            "apps",
            "v1",
            "daemonsets",
            "DaemonSet",
            True,
            short_names=("ds",),
            subresources=status,
            has_generation=True,
            categories=("all",),
        ),
        ResourceType(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            True,
            short_names=("deploy",),
            subresources=status,
            has_generation=True,
            categories=("all",),
        ),
        ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
    ]
    for plural, kind, namespaced in (
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ):
        types.append(ResourceType("rbac.authorization.k8s.io", "v1", plural, kind, namespaced))
    return types
