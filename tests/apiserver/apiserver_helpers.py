"""Shared helpers of the API-server stand-in tests: test CRDs and a raw HTTP client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

GROUP = "example.test"
WIDGETS = f"/apis/{GROUP}/v1/namespaces/default/widgets"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wg"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["disk"],
                                "properties": {
                                    "disk": {
                                        "type": "string",
                                        "x-kubernetes-validations": [
                                            {"rule": "self == oldSelf", "message": "Value is immutable"}
                                        ],
                                    },
                                    "size": {"type": "integer", "default": 3, "minimum": 1, "maximum": 10},
                                    "mode": {"type": "string", "enum": ["fast", "slow"]},
                                    "port": {"x-kubernetes-int-or-string": True},
                                    "note": {"type": "string", "nullable": True},
                                    "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                    "limits": {
                                        "type": "object",
                                        "properties": {"rate": {"type": "integer", "default": 5}},
                                        "x-kubernetes-validations": [
                                            {
                                                "rule": "self.rate <= 100",
                                                "message": "rate must be at most 100",
                                            }
                                        ],
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "phase": {"type": "string"},
                                    "conditions": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "x-kubernetes-preserve-unknown-fields": True,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}

# The same kind without a status subresource: status is part of the main resource then.
GADGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"gadgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Cluster",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


def widget(name: str = "w1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"disk": f"/disks/{name}.qcow2", **spec},
    }


class Kube:
    """A tiny raw HTTP client for the stand-in: answers are (status, decoded JSON, headers)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, user: str = "tester") -> None:
        self.session = session
        self.url = url
        self.user = user

    def as_user(self, user: str) -> Kube:
        return Kube(self.session, self.url, user)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        hdrs = {"Authorization": f"Bearer {self.user}", **(headers or {})}
        data: bytes | None = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            hdrs["Content-Type"] = content_type
        async with self.session.request(
            method, self.url + path, data=data, params=params, headers=hdrs
        ) as resp:
            raw = await resp.read()
            decoded = json.loads(raw) if raw and resp.content_type == "application/json" else raw
            return resp.status, decoded, resp.headers

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, Any]:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
        return await self.request("POST", path, body, **kw)

    async def put(self, path: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
        return await self.request("PUT", path, body, **kw)

    async def patch(self, path: str, body: Any, kind: str = "merge", **kw: Any) -> tuple[int, Any, Any]:
        ctype = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "apply": "application/apply-patch+yaml",
        }[kind]
        return await self.request("PATCH", path, body, content_type=ctype, **kw)

    async def delete(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, Any]:
        return await self.request("DELETE", path, body, **kw)


class WatchStream:
    """Reads one JSON event per line from an open watch response."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 3.0) -> dict[str, Any] | None:
        line = await asyncio.wait_for(self.resp.content.readline(), timeout)
        return json.loads(line) if line else None

    async def rest(self, timeout: float = 3.0) -> list[dict[str, Any]]:
        """All events until the server closes the stream."""
        events = []
        while (event := await self.next(timeout)) is not None:
            events.append(event)
        return events

    async def quiet(self, seconds: float = 0.3) -> bool:
        """True if no event arrives within ``seconds``."""
        try:
            await asyncio.wait_for(self.resp.content.readline(), seconds)
        except TimeoutError:
            return True
        return False
