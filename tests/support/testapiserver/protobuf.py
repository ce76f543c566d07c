"""Decoding the few protobuf request bodies kubectl sends.

kubectl 1.32 encodes the objects of its imperative generators (``kubectl create namespace``,
``create configmap``, ``create secret generic``, ``create serviceaccount``) as
``application/vnd.kubernetes.protobuf``; everything else it sends as JSON. This module owns the
Kubernetes envelope (``k8s\\0`` + ``runtime.Unknown``) and just enough of the wire schemas of those
kinds (and ObjectMeta) to turn them into JSON objects. Any other kind is answered 415 by the caller.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable, Iterator
from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(Exception):
    """The body is not a protobuf message this module can decode."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs; length-delimited values are bytes, varints are ints."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            yield number, data[pos : pos + length]
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")


def _str(value: int | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _map(entries: list[bytes], as_bytes: bool = False) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries:
        key, val = "", ""
        for number, value in _fields(entry):
            if number == 1:
                key = _str(value)
            elif number == 2 and isinstance(value, bytes):
                val = base64.b64encode(value).decode() if as_bytes else value.decode()
        out[key] = val
    return out


def _time(data: bytes) -> str:
    seconds = next((v for n, v in _fields(data) if n == 1 and isinstance(v, int)), 0)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _collect(data: bytes) -> dict[int, list[int | bytes]]:
    out: dict[int, list[int | bytes]] = {}
    for number, value in _fields(data):
        out.setdefault(number, []).append(value)
    return out


def _bytes(values: list[int | bytes]) -> list[bytes]:
    return [v for v in values if isinstance(v, bytes)]


def object_meta(data: bytes) -> dict[str, Any]:
    fields = _collect(data)
    meta: dict[str, Any] = {}
    for number, name in (
        (1, "name"),
        (2, "generateName"),
        (3, "namespace"),
        (5, "uid"),
        (6, "resourceVersion"),
    ):
        if number in fields and _str(fields[number][-1]):  # gogo-proto sends empty strings
            meta[name] = _str(fields[number][-1])
    if 8 in fields:
        meta["creationTimestamp"] = _time(_bytes(fields[8])[-1])
    if 11 in fields:
        meta["labels"] = _map(_bytes(fields[11]))
    if 12 in fields:
        meta["annotations"] = _map(_bytes(fields[12]))
    if 14 in fields:
        meta["finalizers"] = [_str(v) for v in fields[14]]
    return meta


def _namespace(fields: dict[int, list[int | bytes]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    if 2 in fields:
        spec = _collect(_bytes(fields[2])[-1])
        if 1 in spec:
            obj["spec"] = {"finalizers": [_str(v) for v in spec[1]]}
    return obj


def _configmap(fields: dict[int, list[int | bytes]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    if 2 in fields:
        obj["data"] = _map(_bytes(fields[2]))
    if 3 in fields:
        obj["binaryData"] = _map(_bytes(fields[3]), as_bytes=True)
    if 4 in fields:
        obj["immutable"] = bool(fields[4][-1])
    return obj


def _secret(fields: dict[int, list[int | bytes]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    if 2 in fields:
        obj["data"] = _map(_bytes(fields[2]), as_bytes=True)
    if 3 in fields:
        obj["type"] = _str(fields[3][-1])
    if 5 in fields:
        obj["immutable"] = bool(fields[5][-1])
    return obj


def _serviceaccount(fields: dict[int, list[int | bytes]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    if 4 in fields:
        obj["automountServiceAccountToken"] = bool(fields[4][-1])
    return obj


_KINDS: dict[tuple[str, str], Callable[[dict[int, list[int | bytes]]], dict[str, Any]]] = {
    ("v1", "Namespace"): _namespace,
    ("v1", "ConfigMap"): _configmap,
    ("v1", "Secret"): _secret,
    ("v1", "ServiceAccount"): _serviceaccount,
}


def decode(body: bytes) -> dict[str, Any]:
    """A Kubernetes protobuf body as a JSON-shaped object (only the kinds listed above)."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s protobuf magic prefix")
    envelope = _collect(body[len(MAGIC) :])
    type_meta = _collect(_bytes(envelope.get(1, [b""]))[-1])
    api_version = _str(type_meta.get(1, [b""])[-1])
    kind = _str(type_meta.get(2, [b""])[-1])
    decoder = _KINDS.get((api_version, kind))
    if decoder is None:
        raise ProtobufError(f"protobuf bodies of {api_version} {kind} are not supported")
    raw = _collect(_bytes(envelope.get(2, [b""]))[-1])
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind}
    obj["metadata"] = object_meta(_bytes(raw[1])[-1]) if 1 in raw else {}
    obj.update(decoder(raw))
    return obj
