"""Label and field selectors: parsing the query strings and matching objects.

Owns the ``labelSelector`` grammar of apimachinery (``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
``k notin (a,b)``, ``k``, ``!k``, ``k>1``, ``k<1``) and the ``fieldSelector`` grammar (``f=v``,
``f==v``, ``f!=v``), with the real server's quirks: ``!=`` and ``notin`` match objects without the
key, and a field label the resource does not support is a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from testapiserver.errors import bad_request

_KEY = r"[A-Za-z0-9./_-]+"
_VALUE = r"[A-Za-z0-9._-]*"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # =, !=, in, notin, exists, !exists, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if self.op in ("gt", "lt"):
            try:
                number = int(value or "")
            except ValueError:
                return False
            limit = int(self.values[0])
            return number > limit if self.op == "gt" else number < limit
        return False  # pragma: no cover - ops are closed


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside ``( ... )`` sets."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> list[Requirement]:
    if not text:
        return []
    reqs: list[Requirement] = []
    for part in _split_top(text):
        if m := re.fullmatch(rf"({_KEY})\s+(in|notin)\s+\(([^)]*)\)", part):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(Requirement(m.group(1), m.group(2), values))
        elif m := re.fullmatch(rf"({_KEY})\s*(==|=|!=)\s*({_VALUE})", part):
            op = "!=" if m.group(2) == "!=" else "="
            reqs.append(Requirement(m.group(1), op, (m.group(3),)))
        elif m := re.fullmatch(rf"({_KEY})\s*([<>])\s*(-?\d+)", part):
            reqs.append(Requirement(m.group(1), "gt" if m.group(2) == ">" else "lt", (m.group(3),)))
        elif m := re.fullmatch(rf"!\s*({_KEY})", part):
            reqs.append(Requirement(m.group(1), "!exists"))
        elif m := re.fullmatch(rf"({_KEY})", part):
            reqs.append(Requirement(m.group(1), "exists"))
        else:
            raise bad_request(f"unable to parse requirement: {part!r}")
    return reqs


def labels_match(reqs: list[Requirement], obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    negate: bool
    value: str


def parse_field_selector(text: str | None, supported: frozenset[str]) -> list[FieldRequirement]:
    if not text:
        return []
    reqs: list[FieldRequirement] = []
    for part in _split_top(text):
        m = re.fullmatch(r"([A-Za-z0-9._-]+)\s*(==|=|!=)\s*(.*)", part)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        if m.group(1) not in supported:
            raise bad_request(f"field label not supported: {m.group(1)}")
        reqs.append(FieldRequirement(m.group(1), m.group(2) == "!=", m.group(3)))
    return reqs


def field_value(obj: dict[str, Any], path: str) -> str:
    """The string form of a dotted field, as fieldSelectors compare it (missing -> "")."""
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    if isinstance(node, dict):  # e.g. Event's `source`: a real server matches source.component
        return str(node.get("component", ""))
    return str(node)


def fields_match(reqs: list[FieldRequirement], obj: dict[str, Any]) -> bool:
    return all((field_value(obj, r.field) == r.value) != r.negate for r in reqs)


@dataclass(frozen=True)
class Selection:
    """Everything that narrows a list or a watch: scope and both selectors."""

    namespace: str | None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()
    extra: Callable[[dict[str, Any]], bool] | None = None

    def matches(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if not labels_match(list(self.labels), obj):
            return False
        if not fields_match(list(self.fields), obj):
            return False
        return self.extra is None or self.extra(obj)
