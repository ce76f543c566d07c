"""Every manifest is a valid Kubernetes object, and deploy/ renders to exactly what it should.

The schemas come from the PyPI package kubernetes-validate (Kubernetes' own OpenAPI, converted
to JSON Schema per release, in "strict" flavour: unknown fields are errors, as with kubectl's
default `--validate=strict`). No cluster and no network needed.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest

from .support import CRD_FILE, REPO, SAMPLES, Doc, kubectl_kustomize, load_docs, manifest_files

#: 1.31 is the oldest Kubernetes the agent works with (it watches through the CRD's
#: selectableFields, beta and on by default since 1.31); 1.32 is the kubectl on our machines.
KUBERNETES_VERSIONS = ("1.31.0", "1.32.0")
#: Documents that are not Kubernetes API objects, or whose schema is our own CRD.
NOT_IN_KUBERNETES_SCHEMAS = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),  # rendered below instead
    ("kustomize.config.k8s.io/v1alpha1", "Component"),  # rendered in test_deploy_libvirt.py
    ("blockpull.dev/v1alpha1", "BlockPull"),  # validated against the CRD in test_crd.py
    # The Prometheus Operator's kinds (deploy/monitoring): not Kubernetes' own schemas;
    # tests/unit/test_metrics_alerts.py checks them against the DaemonSet and promtool.
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
EXPECTED_OBJECTS = {
    ("Namespace", None, "blockpull-system"),
    ("CustomResourceDefinition", None, "blockpulls.blockpull.dev"),
    ("ServiceAccount", "blockpull-system", "blockpull-agent"),
    ("ClusterRole", None, "blockpull-agent"),
    ("ClusterRoleBinding", None, "blockpull-agent"),
    ("DaemonSet", "blockpull-system", "blockpull-agent"),
}


def _documents() -> list[tuple[str, Doc]]:
    return [
        (f"{path.relative_to(REPO)}#{index}", doc)
        for path in manifest_files()
        for index, doc in enumerate(load_docs(path))
        if (doc["apiVersion"], doc["kind"]) not in NOT_IN_KUBERNETES_SCHEMAS
    ]


def _validate(doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {error.message}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), _documents(), ids=lambda value: value)
def test_file_documents_are_valid_kubernetes_objects(where: str, doc: Doc, version: str) -> None:
    _validate(doc, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_documents_are_valid_kubernetes_objects(rendered: list[Doc], version: str) -> None:
    for doc in rendered:
        _validate(doc, version)


def test_deploy_renders_exactly_the_agent_installation(rendered: list[Doc]) -> None:
    found = [(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]) for doc in rendered]
    assert sorted(found, key=str) == sorted(EXPECTED_OBJECTS, key=str)
    # The namespace comes first, so `kubectl apply -k` never creates into a missing namespace.
    assert rendered[0]["kind"] == "Namespace"


def test_deploy_uses_the_crd_file_itself(rendered: list[Doc]) -> None:
    (crd,) = load_docs(CRD_FILE)
    (rendered_crd,) = (doc for doc in rendered if doc["kind"] == "CustomResourceDefinition")
    assert rendered_crd == crd


def test_deploy_sets_the_published_image(rendered: list[Doc]) -> None:
    (daemonset,) = (doc for doc in rendered if doc["kind"] == "DaemonSet")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/blockpull/blockpull-agent:0.1.0"


def test_samples_are_not_installed_by_deploy(rendered: list[Doc]) -> None:
    assert not [doc for doc in rendered if doc["kind"] == "BlockPull"]


def test_samples_kustomization_renders_every_sample() -> None:
    docs = kubectl_kustomize(SAMPLES)
    files = sorted(path for path in SAMPLES.glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(doc["metadata"]["name"] for doc in docs) == sorted(
        load_docs(path)[0]["metadata"]["name"] for path in files
    )
    assert {doc["kind"] for doc in docs} == {"BlockPull"}


def test_every_yaml_file_is_reachable_from_a_kustomization() -> None:
    """No manifest is forgotten: each file is listed by the kustomization of its directory."""
    for path in manifest_files():
        if path.name == "kustomization.yaml":
            continue
        (kustomization,) = load_docs(path.parent / "kustomization.yaml")
        assert path.name in kustomization.get("resources", []), f"{path} is not in its kustomization"


def test_kustomizations_reference_existing_paths() -> None:
    for path in manifest_files():
        if path.name == "kustomization.yaml":
            (kustomization,) = load_docs(path)
            for resource in kustomization.get("resources", []):
                assert Path(path.parent, resource).exists(), f"{path}: {resource} does not exist"
