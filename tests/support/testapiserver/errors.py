"""Kubernetes ``Status`` failures: the one exception type every layer raises, and its builders.

Owns the wording, HTTP code, ``reason`` and ``details`` of every error answer, so that clients
(kopf, the official client, kubectl) see the same shapes a real kube-apiserver sends: a
``Status`` object with ``kind: Status``, ``apiVersion: v1``, ``status: Failure``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cause:
    """One field-level cause of an ``Invalid`` (422) answer, as in ``details.causes``."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}


@dataclass
class APIError(Exception):
    """A failure answered to the client as a ``Status`` object with the given HTTP code."""

    code: int
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def qualified(group: str, plural: str) -> str:
    """``widgets.example.test`` for custom groups, bare ``namespaces`` for the core group."""
    return f"{plural}.{group}" if group else plural


def _details(group: str, kind: str, name: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {"kind": kind}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    return details


def not_found(group: str, plural: str, name: str) -> APIError:
    return APIError(
        404,
        "NotFound",
        f'{qualified(group, plural)} "{name}" not found',
        _details(group, plural, name),
    )


def resource_not_found(path: str) -> APIError:
    # What a real server says for an unknown URL: no details, reason NotFound.
    return APIError(404, "NotFound", "the server could not find the requested resource")


def already_exists(group: str, plural: str, name: str) -> APIError:
    return APIError(
        409,
        "AlreadyExists",
        f'{qualified(group, plural)} "{name}" already exists',
        _details(group, plural, name),
    )


def conflict(group: str, plural: str, name: str, why: str | None = None) -> APIError:
    why = why or (
        "the object has been modified; please apply your changes to the latest version and try again"
    )
    return APIError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(group, plural)} "{name}": {why}',
        _details(group, plural, name),
    )


def invalid(group: str, kind: str, name: str, causes: list[Cause]) -> APIError:
    """422 Invalid with field causes, worded like apimachinery's ``NewInvalid``."""
    what = f"{kind}.{group}" if group else kind
    texts = [f"{c.field}: {c.message}" if c.field else c.message for c in causes]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details = _details(group, kind, name)
    details["causes"] = [c.as_dict() for c in causes]
    return APIError(422, "Invalid", f'{what} "{name}" is invalid: {joined}', details)


def unprocessable(message: str) -> APIError:
    """422 for a patch that cannot be applied (e.g. a failed JSON-patch ``test`` op)."""
    return APIError(
        422,
        "Invalid",
        message,
        {"causes": [{"reason": "FieldValueInvalid", "message": message}]},
    )


def bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


def forbidden(group: str, plural: str, name: str, why: str) -> APIError:
    return APIError(
        403,
        "Forbidden",
        f'{qualified(group, plural)} "{name}" is forbidden: {why}',
        _details(group, plural, name),
    )


def method_not_allowed(message: str | None = None) -> APIError:
    message = message or "the server does not allow this method on the requested resource"
    return APIError(405, "MethodNotAllowed", message)


def unsupported_media_type(content_type: str, accepted: list[str]) -> APIError:
    return APIError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f"{', '.join(accepted)}",
    )


def not_acceptable(accept: str) -> APIError:
    return APIError(
        406,
        "NotAcceptable",
        f"only the following media types are accepted: application/json (asked for {accept})",
    )


def expired(message: str) -> APIError:
    """410 Gone: the requested resourceVersion is older than the kept watch history."""
    return APIError(410, "Expired", message)


def internal(message: str) -> APIError:
    return APIError(500, "InternalError", message)
