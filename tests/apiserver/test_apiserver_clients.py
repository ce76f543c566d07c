"""Real clients against the stand-in: the official ``kubernetes`` client and kubectl 1.32."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from apiserver_helpers import GROUP, widget

from testapiserver import ThreadedAPIServer


def api_client(server: ThreadedAPIServer, tmp_path: Path, user: str) -> Any:
    # The path is passed explicitly: kubernetes.config reads $KUBECONFIG at import time.
    path = server.write_kubeconfig(tmp_path / f"{user}.kubeconfig", user=user)
    return kubernetes.config.new_client_from_config(config_file=str(path))


def test_official_client_crud_and_watch(threaded: ThreadedAPIServer, tmp_path: Path) -> None:
    client = api_client(threaded, tmp_path, "pyclient")
    custom = kubernetes.client.CustomObjectsApi(client)
    args = (GROUP, "v1", "default", "widgets")
    created = custom.create_namespaced_custom_object(*args, widget("w1"))
    rv = created["metadata"]["resourceVersion"]
    assert created["spec"]["size"] == 3

    events: list[tuple[str, str]] = []

    def watch() -> None:
        stream = kubernetes.watch.Watch()
        for event in stream.stream(
            custom.list_namespaced_custom_object, *args, resource_version=rv, timeout_seconds=2
        ):
            events.append((event["type"], event["object"]["metadata"]["name"]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.2)
    custom.patch_namespaced_custom_object(*args, "w1", {"spec": {"size": 4}})
    custom.patch_namespaced_custom_object_status(*args, "w1", {"status": {"phase": "Running"}})
    got = custom.get_namespaced_custom_object(*args, "w1")
    assert got["spec"]["size"] == 4 and got["status"]["phase"] == "Running"
    listing = custom.list_namespaced_custom_object(*args)
    assert [i["metadata"]["name"] for i in listing["items"]] == ["w1"]
    custom.delete_namespaced_custom_object(*args, "w1")
    watcher.join(timeout=10)
    assert events == [("MODIFIED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")]

    with pytest.raises(kubernetes.client.ApiException) as info:
        custom.get_namespaced_custom_object(*args, "w1")
    assert info.value.status == 404

    core = kubernetes.client.CoreV1Api(client)
    core.create_namespace(kubernetes.client.V1Namespace(metadata={"name": "made-by-client"}))
    names = [ns.metadata.name for ns in core.list_namespace().items]
    assert "made-by-client" in names and "default" in names
    assert threaded.requests_by(user="pyclient", writes_only=True)


KUBECTL = shutil.which("kubectl")


class Kubectl:
    def __init__(self, server: ThreadedAPIServer, tmp_path: Path) -> None:
        self.kubeconfig = server.write_kubeconfig(tmp_path / "kubectl.kubeconfig", user="kubectl")
        self.cache = tmp_path / "kube-cache"  # no discovery cache shared between servers/ports

    def argv(self, *args: str) -> list[str]:
        assert KUBECTL is not None
        return [KUBECTL, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache}", *args]

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        done = subprocess.run(
            self.argv(*args), input=input, capture_output=True, text=True, timeout=30, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr}")
        return done.stdout + (done.stderr if not check else "")


def test_kubectl_end_to_end(threaded: ThreadedAPIServer, tmp_path: Path) -> None:
    kubectl = Kubectl(threaded, tmp_path)
    manifest = widget("w1", mode="fast")
    manifest["metadata"]["finalizers"] = ["example.test/keep"]
    text = yaml.safe_dump(manifest)
    assert "created" in kubectl("apply", "-f", "-", input=text)
    assert "unchanged" in kubectl("apply", "-f", "-", input=text)
    manifest["spec"]["mode"] = "slow"
    assert "configured" in kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    table = kubectl("get", "wg")  # the short name resolves through discovery
    assert table.split("\n")[0].split() == ["NAME", "SIZE", "PHASE", "AGE"]
    assert table.split("\n")[1].split()[:2] == ["w1", "3"]
    got = yaml.safe_load(kubectl("get", "widgets", "w1", "-o", "yaml"))
    assert got["spec"] == {"disk": "/disks/w1.qcow2", "mode": "slow", "size": 3}
    assert got["metadata"]["generation"] == 2

    watcher = subprocess.Popen(
        kubectl.argv("get", "widgets", "-w", "--no-headers"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    waiter = subprocess.Popen(
        kubectl.argv("wait", "--for=condition=Completed", "widget/w1", "--timeout=20s"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    kubectl("patch", "widget", "w1", "--type=merge", "-p", '{"spec":{"size":5}}')
    kubectl(
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Done","conditions":[{"type":"Completed","status":"True"}]}}',
    )
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert "condition met" in out
    time.sleep(0.5)
    watcher.terminate()
    watched, _ = watcher.communicate(timeout=10)
    lines = [line.split() for line in watched.strip().split("\n")]
    assert lines[0][:2] == ["w1", "3"] and lines[-1][:3] == ["w1", "5", "Done"]

    bad = kubectl("patch", "widget", "w1", "--type=merge", "-p", '{"spec":{"disk":"/x"}}', check=False)
    assert "Value is immutable" in bad

    # Events show up in describe.
    threaded.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "w1-", "namespace": "default"},
            "involvedObject": {
                "apiVersion": f"{GROUP}/v1",
                "kind": "Widget",
                "name": "w1",
                "namespace": "default",
                "uid": got["metadata"]["uid"],
            },
            "reason": "Flattened",
            "message": "all done",
            "type": "Normal",
            "source": {"component": "blockpull"},
        }
    )
    described = kubectl("describe", "widget", "w1")
    assert "Flattened" in described and "all done" in described

    # Deletion waits for the finalizer; removing it lets kubectl's wait finish.
    assert "deleted" in kubectl("delete", "widget", "w1", "--wait=false")
    pending = yaml.safe_load(kubectl("get", "widget", "w1", "-o", "yaml"))
    assert pending["metadata"]["deletionTimestamp"]
    deleter = subprocess.Popen(
        kubectl.argv("delete", "widget", "w1", "--timeout=20s"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    kubectl("patch", "widget", "w1", "--type=json", "-p", '[{"op":"remove","path":"/metadata/finalizers"}]')
    out, err = deleter.communicate(timeout=20)
    assert deleter.returncode == 0, err
    assert "No resources found" in kubectl("get", "widgets", check=False)

    used = threaded.used_permissions("kubectl")
    assert {p.verb for p in used} >= {"get", "list", "watch", "create", "patch", "delete"}


def test_kubectl_applies_crds_and_namespaces(threaded: ThreadedAPIServer, tmp_path: Path) -> None:
    kubectl = Kubectl(threaded, tmp_path)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.other.test"},
        "spec": {
            "group": "other.test",
            "scope": "Cluster",
            "names": {"plural": "things", "kind": "Thing", "shortNames": ["th"]},
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}
    docs = yaml.safe_dump_all([crd, namespace])
    out = kubectl("apply", "-f", "-", input=docs)
    assert "created" in out
    kubectl("wait", "--for=condition=Established", "crd/things.other.test", "--timeout=10s")
    thing = {"apiVersion": "other.test/v1alpha1", "kind": "Thing", "metadata": {"name": "t"}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(thing))
    assert "t" in kubectl("get", "th", "-o", "name")
    assert "Active" in kubectl("get", "ns", "team")
    # Imperative generators send protobuf bodies.
    assert "created" in kubectl("create", "namespace", "imperative")
    kubectl("create", "configmap", "cm", "--from-literal=a=b", "-n", "imperative")
    got = yaml.safe_load(kubectl("get", "configmap", "cm", "-n", "imperative", "-o", "yaml"))
    assert got["data"] == {"a": "b"} and "generateName" not in got["metadata"]
    # Server-side apply through kubectl.
    thing["spec"] = {"x": 1}
    assert "serverside-applied" in kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(thing))
    assert yaml.safe_load(kubectl("get", "thing", "t", "-o", "yaml"))["spec"] == {"x": 1}
    kubectl("delete", "ns", "team", "--timeout=10s")
    assert "NotFound" in kubectl("get", "ns", "team", check=False)
