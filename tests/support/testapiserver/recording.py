"""The request log, and comparing what clients did with RBAC rules.

Owns ``RecordedRequest`` (one per HTTP request, with the Kubernetes attributes an authorizer sees:
user, verb, API group, resource, subresource, namespace, name) and the helpers tests use to count
writes per client and to check that a ClusterRole/Role grants every permission a client used.

The user is the bearer token (``Authorization: Bearer <name>``), the basic-auth user name, or
``anonymous``: the stand-in authenticates nobody and authorizes everything, it only records.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    user: str
    verb: str  # RBAC verb for resource requests; the lower-cased HTTP method otherwise
    group: str | None = None  # "" for the core group; None for non-resource URLs
    version: str | None = None
    resource: str | None = None  # the plural, e.g. "widgets"
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    content_type: str | None = None
    user_agent: str | None = None
    body: Any = None  # the parsed request body (None for reads)
    status: int | None = None  # the HTTP status answered (200 for watches that streamed)
    injected: bool = False  # answered by an injected failure
    time: float = field(default_factory=time.time)

    @property
    def is_resource_request(self) -> bool:
        return self.resource is not None

    @property
    def is_write(self) -> bool:
        return self.is_resource_request and self.verb in WRITE_VERBS

    @property
    def permission(self) -> Permission | None:
        if self.resource is None or self.group is None:
            return None
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return Permission(self.group, resource, self.verb)


@dataclass(frozen=True, order=True)
class Permission:
    """What RBAC checks: API group, resource (``plural`` or ``plural/subresource``), verb."""

    api_group: str
    resource: str
    verb: str

    def __str__(self) -> str:
        group = self.api_group or "core"
        return f"{self.verb} {self.resource} ({group})"


def filter_requests(
    requests: Iterable[RecordedRequest],
    *,
    user: str | None = None,
    verb: str | Iterable[str] | None = None,
    resource: str | None = None,
    group: str | None = None,
    writes_only: bool = False,
) -> list[RecordedRequest]:
    verbs = {verb} if isinstance(verb, str) else set(verb) if verb is not None else None
    return [
        r
        for r in requests
        if (user is None or r.user == user)
        and (verbs is None or r.verb in verbs)
        and (resource is None or r.resource == resource)
        and (group is None or r.group == group)
        and (not writes_only or r.is_write)
    ]


def used_permissions(requests: Iterable[RecordedRequest], user: str | None = None) -> set[Permission]:
    """Every (group, resource, verb) the user's resource requests needed."""
    out: set[Permission] = set()
    for req in requests:
        if user is not None and req.user != user:
            continue
        perm = req.permission
        if perm is not None:
            out.add(perm)
    return out


def _rule_matches(rule: dict[str, Any], perm: Permission, name: str | None) -> bool:
    groups = rule.get("apiGroups") or []
    resources = rule.get("resources") or []
    verbs = rule.get("verbs") or []
    if "*" not in groups and perm.api_group not in groups:
        return False
    if "*" not in verbs and perm.verb not in verbs:
        return False
    sub = perm.resource.partition("/")[2]
    # RBAC's resource matching: "*", the exact "plural[/sub]", or "*/sub" for any subresource.
    resource_ok = "*" in resources or perm.resource in resources or bool(sub and f"*/{sub}" in resources)
    if not resource_ok:
        return False
    names = rule.get("resourceNames") or []
    return not names or (name is not None and name in names)


def rules_allow(rules: Iterable[dict[str, Any]], perm: Permission, name: str | None = None) -> bool:
    """Whether any PolicyRule (``rules`` of a Role/ClusterRole) grants ``perm``."""
    return any(_rule_matches(rule, perm, name) for rule in rules)


def missing_permissions(
    rules: Iterable[dict[str, Any]],
    requests: Iterable[RecordedRequest],
    user: str | None = None,
) -> set[Permission]:
    """Permissions used by ``user`` that ``rules`` would have denied (a real cluster's 403s)."""
    rules = list(rules)
    missing: set[Permission] = set()
    for req in requests:
        if user is not None and req.user != user:
            continue
        perm = req.permission
        if perm is not None and not rules_allow(rules, perm, req.name):
            missing.add(perm)
    return missing
