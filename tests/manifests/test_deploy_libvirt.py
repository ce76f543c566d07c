"""The libvirt variant of the installation (deploy/components/libvirt), rendered the way a
user's overlay would: the base plus the component. RBAC stays exactly the base's."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import REPO, Doc, kubectl_kustomize, one

COMPONENT = REPO / "deploy" / "components" / "libvirt"


@pytest.fixture(scope="module")
def variant() -> Iterator[list[Doc]]:
    # kustomize refuses an overlay inside its base and absolute paths: a temporary overlay
    # beside deploy/, as a user's own overlay directory would be.
    overlay = Path(tempfile.mkdtemp(prefix=".libvirt-overlay-", dir=REPO))
    try:
        (overlay / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            "resources:\n  - ../deploy\ncomponents:\n  - ../deploy/components/libvirt\n"
        )
        yield kubectl_kustomize(overlay)
    finally:
        shutil.rmtree(overlay)


def test_sets_the_uri_and_the_domain_template(variant: list[Doc]) -> None:
    (container,) = one(variant, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["BLOCKPULL_LIBVIRT_URI"] == "qemu+unix:///system?socket=/run/libvirt/libvirt-sock"
    assert env["BLOCKPULL_DOMAIN_TEMPLATE"] == "{namespace}_{vm}"
    assert "NODE_NAME" in env  # the base's environment is kept


def test_mounts_the_hosts_libvirt_socket_directory_read_only(variant: list[Doc]) -> None:
    pod = one(variant, "DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["libvirt-sockets"]["mountPath"] == "/run/libvirt"
    assert mounts["libvirt-sockets"]["readOnly"] is True
    assert volumes["libvirt-sockets"]["hostPath"] == {"path": "/run/libvirt", "type": "Directory"}
    # The socket's URI points into the mounted directory.
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["BLOCKPULL_LIBVIRT_URI"].split("socket=")[1].startswith("/run/libvirt/")
    # Still unprivileged: the libvirt group is added to the base's groups, nothing else.
    assert pod["securityContext"]["supplementalGroups"][0] == 2376
    assert len(pod["securityContext"]["supplementalGroups"]) == 2
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_rbac_is_the_bases(variant: list[Doc], rendered: list[Doc]) -> None:
    for kind in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount"):
        assert one(variant, kind) == one(rendered, kind)


def test_component_is_documented() -> None:
    text = (REPO / "docs" / "libvirt.md").read_text()
    assert "deploy/components/libvirt" in text
    assert COMPONENT.joinpath("kustomization.yaml").exists()
