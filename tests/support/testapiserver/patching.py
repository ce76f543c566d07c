"""Patch algorithms: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and the merge used for
server-side apply.

Owns only the transformation of documents; the store decides which objects and fields a patch
may touch. Failures raise ``PatchError`` (the HTTP layer answers 422, as a real server does for
a JSON patch whose ``test`` fails or whose path is missing).
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(Exception):
    """The patch could not be applied to the document."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _split_pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer: {pointer!r}")
    return [_unescape(t) for t in pointer[1:].split("/")]


def _resolve_parent(doc: Any, tokens: list[str], pointer: str) -> tuple[Any, str]:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"doc is missing path: {pointer!r}")
            node = node[token]
        elif isinstance(node, list):
            index = _index(node, token, pointer, allow_end=False)
            node = node[index]
        else:
            raise PatchError(f"doc is missing path: {pointer!r}")
    return node, tokens[-1]


def _index(node: list[Any], token: str, pointer: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(node)
    if not token.isdigit():
        raise PatchError(f"invalid array index {token!r} in {pointer!r}")
    index = int(token)
    limit = len(node) + (1 if allow_end else 0)
    if index >= limit:
        raise PatchError(f"array index out of bounds in {pointer!r}")
    return index


def _get(doc: Any, pointer: str) -> Any:
    node = doc
    for token in _split_pointer(pointer):
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, pointer, allow_end=False)]
        else:
            raise PatchError(f"doc is missing path: {pointer!r}")
    return node


def _add(doc: Any, pointer: str, value: Any) -> Any:
    tokens = _split_pointer(pointer)
    if not tokens:
        return copy.deepcopy(value)
    parent, last = _resolve_parent(doc, tokens, pointer)
    if isinstance(parent, dict):
        parent[last] = copy.deepcopy(value)
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, pointer, allow_end=True), copy.deepcopy(value))
    else:
        raise PatchError(f"doc is missing path: {pointer!r}")
    return doc


def _remove(doc: Any, pointer: str) -> Any:
    tokens = _split_pointer(pointer)
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent, last = _resolve_parent(doc, tokens, pointer)
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"unable to remove nonexistent key: {last}: missing value")
        del parent[last]
    elif isinstance(parent, list):
        del parent[_index(parent, last, pointer, allow_end=False)]
    else:
        raise PatchError(f"doc is missing path: {pointer!r}")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 on a copy of ``doc``; a failed ``test`` raises ``PatchError``."""
    if not isinstance(ops, list):
        raise PatchError("a JSON patch must be a list of operations")
    result = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            result = _add(result, path, op.get("value"))
        elif kind == "remove":
            result = _remove(result, path)
        elif kind == "replace":
            _get(result, path)  # must exist
            if path == "":
                result = copy.deepcopy(op.get("value"))
            else:
                result = _add(_remove(result, path), path, op.get("value"))
        elif kind == "move":
            value = copy.deepcopy(_get(result, op.get("from", "")))
            result = _add(_remove(result, op.get("from", "")), path, value)
        elif kind == "copy":
            result = _add(result, path, copy.deepcopy(_get(result, op.get("from", ""))))
        elif kind == "test":
            actual = _get(result, path)
            if actual != op.get("value"):
                raise PatchError(
                    f"testing value {path} failed: test failed"
                    f" (expected {op.get('value')!r}, found {actual!r})"
                )
        else:
            raise PatchError(f"unexpected kind of operation: {kind!r}")
    return result


def _list_semantics(schema: dict[str, Any] | None) -> tuple[str, list[str]]:
    if not schema:
        return "atomic", []
    kind = schema.get("x-kubernetes-list-type", "atomic")
    keys = schema.get("x-kubernetes-list-map-keys") or []
    return str(kind), list(keys)


def _sub_schema(schema: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    if not schema:
        return None
    props = schema.get("properties") or {}
    if isinstance(props.get(key), dict):
        sub: dict[str, Any] = props[key]
        return sub
    addl = schema.get("additionalProperties")
    return addl if isinstance(addl, dict) else None


def apply_merge(
    live: Any,
    applied: Any,
    previous: Any,
    schema: dict[str, Any] | None,
) -> Any:
    """Server-side apply, simplified: merge ``applied`` into ``live``.

    Maps merge key by key; lists follow the schema's ``x-kubernetes-list-type`` (``map`` merges
    items by their keys, ``set`` unions, ``atomic``/unknown replaces). Fields that this field
    manager applied last time (``previous``) but left out now are removed when their live value
    is still what it applied (a stand-in for ownership tracking; there are no managedFields and no
    conflicts between managers).
    """
    if isinstance(applied, dict) and isinstance(live, dict):
        result = copy.deepcopy(live)
        prev = previous if isinstance(previous, dict) else {}
        for key, value in applied.items():
            result[key] = apply_merge(live.get(key), value, prev.get(key), _sub_schema(schema, key))
        for key, old_value in prev.items():
            if key not in applied and key in result and result[key] == old_value:
                del result[key]
        return result
    if isinstance(applied, list) and isinstance(live, list):
        kind, keys = _list_semantics(schema)
        items_schema = schema.get("items") if schema else None
        if kind == "set":
            out = list(live)
            for item in applied:
                if item not in out:
                    out.append(item)
            return out
        if kind == "map" and keys:

            def key_of(item: Any) -> tuple[Any, ...]:
                return tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)

            out = [copy.deepcopy(i) for i in live]
            index = {key_of(i): n for n, i in enumerate(out)}
            for item in applied:
                pos = index.get(key_of(item))
                if pos is None:
                    out.append(copy.deepcopy(item))
                else:
                    out[pos] = apply_merge(out[pos], item, None, items_schema)
            return out
    return copy.deepcopy(applied)
