"""virtlab: a private libvirtd and transient TCG domains with real qcow2 chains, for tests.

- `virtlab.daemon`: `LibvirtDaemon`, a libvirtd (and virtlogd) in a mount namespace of its
  own, restartable mid-test, stopped by pid.
- `virtlab.domains`: `Domain`, a transient `<domain type='qemu'>` created paused, its live
  XML chain and its log's taints; `virsh`.
- `virtlab.checks`: `assert_intact`, `assert_flattened`, `assert_relative_kept`,
  `assert_untainted`: the images as their own headers chain them, and libvirt's XML.
- `virtlab.pytest_plugin`: the `libvirtd` and `domain_factory` fixtures.

Builds on `qemulab` for the chains. Needs libvirtd, virtlogd, virsh, unshare and nsenter, and
root (mounts in a private namespace).
"""

from __future__ import annotations

from virtlab.checks import assert_flattened, assert_intact, assert_relative_kept, assert_untainted
from virtlab.daemon import DaemonError, LibvirtDaemon, libvirtd_available
from virtlab.domains import Domain, DomainDisk, VirshError, domain_xml, virsh, xml_chain

__all__ = [
    "DaemonError",
    "Domain",
    "DomainDisk",
    "LibvirtDaemon",
    "VirshError",
    "assert_flattened",
    "assert_intact",
    "assert_relative_kept",
    "assert_untainted",
    "domain_xml",
    "libvirtd_available",
    "virsh",
    "xml_chain",
]
