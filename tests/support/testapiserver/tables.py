"""Server-side printing: ``meta.k8s.io/v1`` ``Table`` answers for ``kubectl get``.

Owns the Table shape (Name column + the resource's printer columns, e.g. a CRD's
``additionalPrinterColumns``), the tiny JSONPath subset those columns use (``.a.b``, ``[0]``,
``[*]``, ``[?(@.type=="Ready")]``), and the human-readable ages a real server renders for ``date``
columns.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from testapiserver.resources import PrinterColumn, ResourceType

_TOKEN = re.compile(
    r"""\.(?P<name>(?:\\\.|[^.\[])+)"""
    r"""|\[(?P<index>-?\d+|\*)\]"""
    r"""|\[\?\(@\.(?P<fkey>[\w.-]+)\s*==\s*(?P<q>["'])(?P<fval>.*?)(?P=q)\)\]"""
)


def jsonpath(obj: Any, path: str) -> list[Any]:
    """All values at ``path`` (a JSONPath subset), in document order."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if path.startswith("$"):
        path = path[1:]
    nodes: list[Any] = [obj]
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if not m:
            return []
        pos = m.end()
        out: list[Any] = []
        for node in nodes:
            if m.group("name") is not None:
                key = m.group("name").replace("\\.", ".")
                if isinstance(node, dict) and key in node:
                    out.append(node[key])
            elif m.group("index") is not None:
                if isinstance(node, list):
                    if m.group("index") == "*":
                        out.extend(node)
                    else:
                        index = int(m.group("index"))
                        if -len(node) <= index < len(node):
                            out.append(node[index])
            elif isinstance(node, list):
                key, want = m.group("fkey"), m.group("fval")
                out.extend(i for i in node if isinstance(i, dict) and str(i.get(key)) == want)
        nodes = out
    return nodes


def human_duration(seconds: float) -> str:
    """apimachinery's ``duration.HumanDuration``."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y{rest}d" if rest else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _age(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return human_duration((datetime.datetime.now(datetime.UTC) - stamp).total_seconds())


def _cell(column: PrinterColumn, obj: dict[str, Any]) -> Any:
    if column.compute is not None:
        value = column.compute(obj)
    else:
        found = jsonpath(obj, column.json_path)
        value = found[0] if found else None
    if value is None:
        return None
    if column.type == "date":
        return _age(value)
    if column.type == "integer":
        return value if isinstance(value, int) else None
    if column.type == "number":
        return value if isinstance(value, int | float) else None
    if column.type == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value) if not isinstance(value, str) else value


def column_definitions(rtype: ResourceType) -> list[dict[str, Any]]:
    columns = [
        {
            "name": "Name",
            "type": "string",
            "format": "name",
            "priority": 0,
            "description": "Name must be unique within a namespace.",
        }
    ]
    for c in rtype.printer_columns:
        columns.append(
            {
                "name": c.name,
                "type": c.type,
                "format": c.format,
                "description": c.description,
                "priority": c.priority,
            }
        )
    return columns


def row(rtype: ResourceType, obj: dict[str, Any], include_object: str) -> dict[str, Any]:
    cells = [obj.get("metadata", {}).get("name")] + [_cell(c, obj) for c in rtype.printer_columns]
    result: dict[str, Any] = {"cells": cells}
    if include_object == "Object":
        result["object"] = obj
    elif include_object != "None":
        result["object"] = {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata", {}),
        }
    return result


def table(
    rtype: ResourceType,
    objs: list[dict[str, Any]],
    *,
    resource_version: str,
    include_object: str = "Metadata",
    with_columns: bool = True,
    continue_token: str | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
    out: dict[str, Any] = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
    if with_columns:
        out["columnDefinitions"] = column_definitions(rtype)
    out["rows"] = [row(rtype, o, include_object) for o in objs]
    return out


def wants_table(accept: str) -> bool:
    """Whether the Accept header asks for a Table first (kubectl get does; -o yaml does not)."""
    first = accept.split(",", maxsplit=1)[0].replace(" ", "")
    return "as=Table" in first and "g=meta.k8s.io" in first
