"""BlockPull for libvirt-managed VMs, through libvirt's own block-job API.

- `blockpull.libvirt.connection`: `LibvirtConnection` (one per URI, asyncio through
  libvirtaio, keepalive, reconnect after libvirtd restarts) and `LibvirtConnections`.
- `blockpull.libvirt.driver`: `LibvirtDriver`, the `BlockJobDriver` for one domain, put
  together from `domainview` (reading the domain), `commands` (starting and steering a job,
  libvirt's refusals mapped), `jobnames` (the ids a job answers to, kept in the domain's
  metadata) and `outcomes` (waiting for the events that tell how a job ended).
- `blockpull.libvirt.watchdog`: the bound on a libvirt call that blocks the loop.
- `blockpull.libvirt.xmlchain`: disks, chains and names from libvirt's live XML (pure).
- `blockpull.libvirt.templates`: the URI and domain-name templates (pure).

Only `connection` and the driver's modules need the `libvirt-python` binding (and libvirt's
client library, Debian `libvirt0`); nothing is imported here, so that the pure modules (the
agent's settings use `templates`) load without it.
"""
