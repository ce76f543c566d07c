"""BlockPull for libvirt-managed VMs, through libvirt's own block-job API.

- `blockpull.libvirt.connection`: `LibvirtConnection` (one per URI, asyncio through
  libvirtaio, keepalive, reconnect after libvirtd restarts) and `LibvirtConnections`.
- `blockpull.libvirt.driver`: `LibvirtDriver`, the `BlockJobDriver` for one domain.
- `blockpull.libvirt.xmlchain`: disks, chains and names from libvirt's live XML (pure).

Needs the `libvirt-python` binding (and libvirt's client library, Debian `libvirt0`).
"""

from __future__ import annotations

from blockpull.libvirt.connection import LibvirtConnection, LibvirtConnections, job_id_of
from blockpull.libvirt.driver import LibvirtDriver

__all__ = ["LibvirtConnection", "LibvirtConnections", "LibvirtDriver", "job_id_of"]
