"""How the agent reaches libvirt domains: the `VMs` interface over libvirt's block-job API.

Owns: turning (namespace, `spec.vm`) into a `LibvirtDriver` through the URI and domain
templates, over one shared libvirt connection per URI (re-opened after libvirtd restarts),
and closing them all at shutdown.
"""

from __future__ import annotations

from blockpull.libvirt.connection import LibvirtConnections
from blockpull.libvirt.driver import LibvirtDriver
from blockpull.libvirt.templates import DomainTemplate, URITemplate


class LibvirtVMs:
    """`VMs` over libvirt: the domain `domain_template(namespace, vm)` at `uri_template(...)`."""

    def __init__(
        self, uri_template: URITemplate, domain_template: DomainTemplate, *, call_timeout: float
    ) -> None:
        self._uris = uri_template
        self._domains = domain_template
        self._connections = LibvirtConnections(call_timeout=call_timeout)

    def locate(self, namespace: str, vm: str) -> str:
        return (
            f"libvirt domain {self._domains.domain_for(namespace, vm)} at {self._uris.uri_for(namespace, vm)}"
        )

    async def driver_for(self, namespace: str, vm: str) -> LibvirtDriver:
        conn = await self._connections.get(self._uris.uri_for(namespace, vm))
        return LibvirtDriver(conn, self._domains.domain_for(namespace, vm))

    async def close_all(self) -> None:
        await self._connections.close_all()

    def __len__(self) -> int:
        return len(self._connections)
