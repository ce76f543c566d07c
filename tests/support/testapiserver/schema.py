"""Structural-schema handling of custom resources: pruning, null-dropping, defaulting, validation.

Owns what a real server does with a CRD version's ``openAPIV3Schema`` on every write:

* unknown fields are pruned (``x-kubernetes-preserve-unknown-fields`` keeps them), and reported
  so that ``fieldValidation=Strict|Warn|Ignore`` can be honoured by the caller;
* ``null`` values of non-``nullable`` fields are dropped, then ``default:`` values are filled in;
* the object is validated with ``jsonschema`` (Draft 4, which shares OpenAPI 3.0's boolean
  ``exclusiveMinimum``/``exclusiveMaximum``) after translating the Kubernetes extensions
  (``nullable``, ``x-kubernetes-int-or-string``); errors become field ``Cause`` s worded like
  kube-openapi's.

Also owns ObjectMeta checks (names, labels) done by the server for every resource.
``format:`` keywords are not checked (a real server checks a few, e.g. ``int32``, ``date-time``).
CEL rules (``x-kubernetes-validations``) live in :mod:`testapiserver.cel`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema

from testapiserver.errors import Cause

# ObjectMeta fields a client may send; anything else under metadata is pruned as unknown,
# because metadata is a typed struct in the real server, not free-form JSON.
OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def render_value(value: Any) -> str:
    """A value as it appears in ``Invalid value: ...`` messages (JSON-ish, like Go's %#v)."""
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(value)


def format_path(parts: Iterator[str | int] | list[str | int]) -> str:
    """``["spec", "items", 0, "x"]`` -> ``spec.items[0].x``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class StructuralSchema:
    """One CRD version's ``openAPIV3Schema``, prepared for prune/default/validate."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw: dict[str, Any] = copy.deepcopy(raw)
        translated = _translate(self.raw)
        # Metadata is validated by the server itself (see validate_object_meta), never by the
        # CRD's schema: a real server only allows name/generateName restrictions there.
        props = translated.get("properties")
        if isinstance(props, dict):
            props.pop("metadata", None)
        self._validator = jsonschema.Draft4Validator(translated)

    # --- pruning -------------------------------------------------------------------------------

    def prune(self, obj: dict[str, Any]) -> list[str]:
        """Drop fields the schema does not know; return their paths (``spec.foo``)."""
        unknown: list[str] = []
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            for key in list(meta):
                if key not in OBJECT_META_FIELDS:
                    del meta[key]
                    unknown.append(f"metadata.{key}")
        for key in list(obj):
            if key in ("apiVersion", "kind", "metadata"):
                continue
            sub = _property_schema(self.raw, key)
            if sub is None:
                if not self.raw.get("x-kubernetes-preserve-unknown-fields"):
                    del obj[key]
                    unknown.append(key)
            else:
                _prune(sub, obj[key], key, unknown)
        return unknown

    # --- nulls & defaults ----------------------------------------------------------------------

    def apply_defaults(self, obj: dict[str, Any]) -> None:
        """Drop nulls of non-nullable fields, then fill in ``default:`` values (in place)."""
        _default(self.raw, obj, root=True)

    # --- validation ----------------------------------------------------------------------------

    def validate(self, obj: dict[str, Any]) -> list[Cause]:
        causes: list[Cause] = []
        seen: set[tuple[str, str]] = set()
        for error in self._validator.iter_errors(obj):
            for cause in _causes_of(error):
                if (cause.field, cause.message) not in seen:
                    seen.add((cause.field, cause.message))
                    causes.append(cause)
        return causes


def _property_schema(node: dict[str, Any], key: str) -> dict[str, Any] | None:
    props = node.get("properties")
    if isinstance(props, dict) and isinstance(props.get(key), dict):
        sub: dict[str, Any] = props[key]
        return sub
    addl = node.get("additionalProperties")
    if isinstance(addl, dict):
        return addl
    if addl is True:
        return {"x-kubernetes-preserve-unknown-fields": True}
    return None


def _prune(node: dict[str, Any], value: Any, path: str, unknown: list[str]) -> None:
    if isinstance(value, dict):
        if node.get("x-kubernetes-embedded-resource"):
            meta = value.get("metadata")
            if isinstance(meta, dict):
                for key in list(meta):
                    if key not in OBJECT_META_FIELDS:
                        del meta[key]
                        unknown.append(f"{path}.metadata.{key}")
        preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
        embedded = bool(node.get("x-kubernetes-embedded-resource"))
        for key in list(value):
            if embedded and key in ("apiVersion", "kind", "metadata"):
                continue
            sub = _property_schema(node, key)
            if sub is not None:
                _prune(sub, value[key], join_path(path, key), unknown)
            elif not preserve:
                del value[key]
                unknown.append(join_path(path, key))
    elif isinstance(value, list):
        items = node.get("items")
        if isinstance(items, dict):
            for index, item in enumerate(value):
                _prune(items, item, f"{path}[{index}]", unknown)


def _default(node: dict[str, Any], value: Any, *, root: bool = False) -> None:
    if isinstance(value, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            for key, sub in props.items():
                if not isinstance(sub, dict) or (root and key == "metadata"):
                    continue
                if key in value and value[key] is None and not sub.get("nullable"):
                    del value[key]
                if key not in value and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                continue
            sub_schema = _property_schema(node, key)
            if sub_schema is not None:
                _default(sub_schema, item)
    elif isinstance(value, list):
        items = node.get("items")
        if isinstance(items, dict):
            for item in value:
                _default(items, item)


def _translate(node: Any) -> Any:
    """OpenAPI-with-Kubernetes-extensions -> plain JSON Schema Draft 4."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: _translate(v) for k, v in value.items()} if isinstance(value, dict) else value
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _translate(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_translate(v) for v in value] if isinstance(value, list) else value
        elif key == "default" or key.startswith("x-kubernetes-"):
            continue  # not validation keywords; handled elsewhere
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string") and "type" not in out:
        out["type"] = ["integer", "string"]
        # The usual anyOf [{type: integer}, {type: string}] is redundant now; keep it harmless.
    if node.get("nullable"):
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
        elif isinstance(kind, list) and "null" not in kind:
            out["type"] = [*kind, "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        for junctor in ("anyOf", "oneOf"):
            if isinstance(out.get(junctor), list):
                out[junctor] = [*out[junctor], {"type": "null"}]
    return out


def _causes_of(error: jsonschema.ValidationError) -> list[Cause]:
    path = format_path(list(error.absolute_path))
    where = path or "<root>"
    value: Any = error.instance
    kind = error.validator
    expected: Any = error.validator_value
    if kind == "required":
        missing = [p for p in expected if isinstance(value, dict) and p not in value]
        return [Cause(join_path(path, p), "Required value", "FieldValueRequired") for p in missing]
    if kind == "type":
        types = expected if isinstance(expected, list) else [expected]
        shown = ", ".join(t for t in types if t != "null")
        msg = f"{where} in body must be of type {shown}: {render_value(_type_name(value))}"
        return [Cause(path, f"Invalid value: {render_value(_type_name(value))}: {msg}")]
    if kind == "enum":
        options = ", ".join(json.dumps(v) for v in expected)
        return [
            Cause(
                path,
                f"Unsupported value: {render_value(value)}: supported values: {options}",
                "FieldValueNotSupported",
            )
        ]
    if kind == "maxLength":
        return [Cause(path, f"Too long: may not be more than {expected} bytes", "FieldValueTooLong")]
    if kind == "maxItems":
        return [
            Cause(path, f"Too many: {len(value)}: must have at most {expected} items", "FieldValueTooMany")
        ]
    wording = {
        "minimum": f"should be greater than or equal to {expected}",
        "maximum": f"should be less than or equal to {expected}",
        "minLength": f"should be at least {expected} chars long",
        "pattern": f"should match '{expected}'",
        "minItems": f"should have at least {expected} items",
        "uniqueItems": "shall give unique items",
        "minProperties": f"should have at least {expected} properties",
        "maxProperties": f"should have at most {expected} properties",
        "multipleOf": f"should be a multiple of {expected}",
    }
    text = wording.get(str(kind))
    if text is not None:
        return [Cause(path, f"Invalid value: {render_value(value)}: {where} in body {text}")]
    return [Cause(path, f"Invalid value: {render_value(value)}: {error.message}")]


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


# --- ObjectMeta checks done by the server for every resource -------------------------------------


def name_causes(name: str, *, dns_label: bool = False, field: str = "metadata.name") -> list[Cause]:
    """A real server's name rules: RFC 1123 subdomain (or label, e.g. for namespaces)."""
    if dns_label:
        if len(name) > 63 or not _DNS_LABEL.match(name):
            return [
                Cause(
                    field,
                    f"Invalid value: {json.dumps(name)}: a lowercase RFC 1123 label must consist of"
                    " lower case alphanumeric characters or '-', and must start and end with an"
                    " alphanumeric character",
                )
            ]
        return []
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        return [
            Cause(
                field,
                f"Invalid value: {json.dumps(name)}: a lowercase RFC 1123 subdomain must consist of"
                " lower case alphanumeric characters, '-' or '.', and must start and end with an"
                " alphanumeric character",
            )
        ]
    return []


def _qualified_name_ok(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


def validate_object_meta(meta: dict[str, Any], *, dns_label: bool = False) -> list[Cause]:
    """Names, label keys/values, annotation keys and finalizer names, as a real server checks."""
    causes: list[Cause] = []
    name = meta.get("name")
    if isinstance(name, str) and name:
        causes += name_causes(name, dns_label=dns_label)
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        causes.append(Cause("metadata.labels", "Invalid value: must be a map of strings"))
        labels = {}
    for key, val in labels.items():
        if not _qualified_name_ok(str(key)):
            causes.append(
                Cause(
                    "metadata.labels",
                    f"Invalid value: {json.dumps(key)}: name part must be a valid qualified name",
                )
            )
        if not isinstance(val, str) or len(val) > 63 or (val and not _QUALIFIED_NAME.match(val)):
            causes.append(
                Cause(
                    f"metadata.labels.{key}",
                    f"Invalid value: {json.dumps(val)}: a valid label"
                    " must be an empty string or consist of alphanumeric characters, '-', '_'"
                    " or '.', and must start and end with an alphanumeric character",
                )
            )
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        causes.append(Cause("metadata.annotations", "Invalid value: must be a map of strings"))
        annotations = {}
    for key, val in annotations.items():
        if not _qualified_name_ok(str(key)):
            causes.append(
                Cause(
                    "metadata.annotations",
                    f"Invalid value: {json.dumps(key)}: name part must be a valid qualified name",
                )
            )
        if not isinstance(val, str):
            causes.append(
                Cause(f"metadata.annotations.{key}", "Invalid value: annotation values must be strings")
            )
    finalizers = meta.get("finalizers") or []
    if not isinstance(finalizers, list):
        causes.append(Cause("metadata.finalizers", "Invalid value: must be a list of strings"))
        finalizers = []
    for index, fin in enumerate(finalizers):
        if not isinstance(fin, str) or not _qualified_name_ok(fin):
            causes.append(
                Cause(
                    f"metadata.finalizers[{index}]",
                    f"Invalid value: {json.dumps(fin)}: name part must be a valid qualified name",
                )
            )
    return causes
