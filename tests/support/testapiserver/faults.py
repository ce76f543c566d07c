"""Injected failures: make the next N matching requests fail (or stall) on purpose.

Owns the rules tests add (a predicate over ``RecordedRequest`` plus convenience matchers), which
rule a request hits, and the ``Status`` answer it gets. A matched request fails *before* it
touches the store, like a request rejected by an overloaded or restarting API server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from testapiserver.errors import APIError
from testapiserver.recording import RecordedRequest

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

Predicate = Callable[[RecordedRequest], bool]


@dataclass
class FailureRule:
    predicate: Predicate
    remaining: int | None  # None: fail forever (until cleared)
    status: int | None  # None: only delay, then serve normally
    reason: str
    message: str
    delay: float = 0.0
    retry_after: int | None = None
    hits: list[RecordedRequest] = field(default_factory=list)

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def error(self) -> APIError:
        details: dict[str, object] = {}
        if self.retry_after is not None:
            details["retryAfterSeconds"] = self.retry_after
        return APIError(self.status or 500, self.reason, self.message, details)


def matcher(
    predicate: Predicate | None = None,
    *,
    method: str | None = None,
    verb: str | None = None,
    group: str | None = None,
    resource: str | None = None,
    subresource: str | None = None,
    namespace: str | None = None,
    name: str | None = None,
    user: str | None = None,
) -> Predicate:
    """A predicate requiring every given attribute (and ``predicate``, if any)."""

    def match(req: RecordedRequest) -> bool:
        if method is not None and req.method.upper() != method.upper():
            return False
        checks = (
            (verb, req.verb),
            (group, req.group),
            (resource, req.resource),
            (subresource, req.subresource),
            (namespace, req.namespace),
            (name, req.name),
            (user, req.user),
        )
        if any(want is not None and have != want for want, have in checks):
            return False
        return predicate is None or predicate(req)

    return match


class Faults:
    def __init__(self) -> None:
        self._rules: list[FailureRule] = []
        self._lock = threading.Lock()  # rules are added from test threads, hit on the loop

    def add(self, rule: FailureRule) -> FailureRule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def hit(self, req: RecordedRequest) -> FailureRule | None:
        """The first live rule matching ``req`` (consuming one of its uses), or None."""
        with self._lock:
            for rule in self._rules:
                if rule.exhausted or not rule.predicate(req):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                rule.hits.append(req)
                return rule
        return None


def reason_for(status: int) -> str:
    return _REASONS.get(status, "InternalError" if status >= 500 else "BadRequest")
