"""Deletion with finalizers, namespace and CRD cleanup, garbage collection, discovery."""

from __future__ import annotations

import copy
from typing import Any

from apiserver_helpers import GROUP, WIDGET_CRD, WIDGETS, Kube, widget

from testapiserver import APIServer

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


async def test_finalizers_hold_deletion(api: APIServer, kube: Kube, crd: dict[str, Any]) -> None:
    body = widget("w1")
    body["metadata"]["finalizers"] = ["example.test/a", "example.test/b"]
    await kube.post(WIDGETS, body)
    status, obj, _ = await kube.delete(f"{WIDGETS}/w1", {"propagationPolicy": "Background"})
    assert status == 200 and obj["metadata"]["deletionTimestamp"]
    assert obj["metadata"]["generation"] == 2  # marking for deletion bumps generation
    status, again, _ = await kube.delete(f"{WIDGETS}/w1")
    assert again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    # New finalizers cannot be added while deleting; removing them is how deletion completes.
    status, body, _ = await kube.patch(
        f"{WIDGETS}/w1", {"metadata": {"finalizers": ["example.test/a", "example.test/b", "example.test/c"]}}
    )
    assert status == 422
    _, obj, _ = await kube.patch(f"{WIDGETS}/w1", {"metadata": {"finalizers": ["example.test/b"]}})
    assert api.get_object(GROUP, "v1", "widgets", "w1", "default") is not None
    status, _, _ = await kube.patch(
        f"{WIDGETS}/w1",
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj["metadata"]["resourceVersion"]},
            {"op": "remove", "path": "/metadata/finalizers"},
        ],
        kind="json",
    )
    assert status == 200
    assert api.get_object(GROUP, "v1", "widgets", "w1", "default") is None


async def test_delete_without_finalizers_answers_success_status(kube: Kube, crd: dict[str, Any]) -> None:
    _, obj, _ = await kube.post(WIDGETS, widget("w1"))
    status, body, _ = await kube.delete(f"{WIDGETS}/w1")
    assert status == 200
    assert (body["kind"], body["status"]) == ("Status", "Success")
    assert body["details"] == {"name": "w1", "group": GROUP, "kind": "widgets", "uid": obj["metadata"]["uid"]}
    status, body, _ = await kube.delete(f"{WIDGETS}/w1")
    assert status == 404


async def test_delete_preconditions(kube: Kube, crd: dict[str, Any]) -> None:
    await kube.post(WIDGETS, widget("w1"))
    status, _, _ = await kube.delete(f"{WIDGETS}/w1", {"preconditions": {"uid": "nope"}})
    assert status == 409


async def test_namespace_deletion_cascades(api: APIServer, kube: Kube, crd: dict[str, Any]) -> None:
    api.create_namespace("doomed")
    path = f"/apis/{GROUP}/v1/namespaces/doomed/widgets"
    held = widget("held")
    held["metadata"]["finalizers"] = ["example.test/keep"]
    await kube.post(path, held)
    await kube.post(path, widget("free"))
    status, ns, _ = await kube.delete("/api/v1/namespaces/doomed")
    assert status == 200 and ns["status"]["phase"] == "Terminating"
    assert [o["metadata"]["name"] for o in api.objects(GROUP, "v1", "widgets", "doomed")] == ["held"]
    status, body, _ = await kube.post(path, widget("late"))
    assert (status, body["reason"]) == (403, "Forbidden")
    await kube.patch(f"{path}/held", {"metadata": {"finalizers": None}})
    status, _, _ = await kube.get("/api/v1/namespaces/doomed")
    assert status == 404


async def test_garbage_collection_by_owner(api: APIServer, kube: Kube, crd: dict[str, Any]) -> None:
    _, owner, _ = await kube.post(WIDGETS, widget("owner"))
    ref = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "name": "owner", "uid": owner["metadata"]["uid"]}
    for name in ("child", "orphan"):
        body = widget(name)
        body["metadata"]["ownerReferences"] = [ref]
        await kube.post(WIDGETS, body)
    await kube.patch(f"{WIDGETS}/orphan", {"metadata": {"labels": {"keep": "me"}}})
    await kube.delete(f"{WIDGETS}/owner")
    assert [o["metadata"]["name"] for o in api.objects(GROUP, "v1", "widgets")] == []
    # Orphan propagation strips the references instead.
    _, owner, _ = await kube.post(WIDGETS, widget("owner"))
    body = widget("child")
    body["metadata"]["ownerReferences"] = [ref | {"uid": owner["metadata"]["uid"]}]
    await kube.post(WIDGETS, body)
    await kube.delete(f"{WIDGETS}/owner", {"propagationPolicy": "Orphan"})
    (child,) = api.objects(GROUP, "v1", "widgets")
    assert "ownerReferences" not in child["metadata"]


async def test_discovery_follows_crds(api: APIServer, kube: Kube) -> None:
    status, _, _ = await kube.get(f"/apis/{GROUP}/v1")
    assert status == 404
    status, created, _ = await kube.post(CRDS, copy.deepcopy(WIDGET_CRD))
    assert status == 201
    conditions = {c["type"]: c["status"] for c in created["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    assert created["metadata"]["finalizers"] == ["customresourcecleanup.apiextensions.k8s.io"]
    _, groups, _ = await kube.get("/apis")
    entry = next(g for g in groups["groups"] if g["name"] == GROUP)
    assert entry["preferredVersion"] == {"groupVersion": f"{GROUP}/v1", "version": "v1"}
    _, group, _ = await kube.get(f"/apis/{GROUP}")
    assert group["kind"] == "APIGroup"
    _, resources, _ = await kube.get(f"/apis/{GROUP}/v1")
    assert resources["kind"] == "APIResourceList" and resources["groupVersion"] == f"{GROUP}/v1"
    main, status_entry = resources["resources"]
    assert main | {"storageVersionHash": None} == {
        "name": "widgets",
        "singularName": "widget",
        "namespaced": True,
        "kind": "Widget",
        "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        "shortNames": ["wg"],
        "storageVersionHash": None,
    }
    assert status_entry["name"] == "widgets/status"
    _, core, _ = await kube.get("/api")
    assert core["versions"] == ["v1"]
    _, v1, _ = await kube.get("/api/v1")
    assert {"namespaces", "events"} <= {r["name"] for r in v1["resources"]}
    _, version, _ = await kube.get("/version")
    assert version["major"] == "1"
    _, index, _ = await kube.get("/openapi/v3")
    assert f"apis/{GROUP}/v1" in index["paths"]
    _, doc, _ = await kube.get(index["paths"][f"apis/{GROUP}/v1"]["serverRelativeURL"])
    patch = doc["paths"][f"/apis/{GROUP}/v1/namespaces/{{namespace}}/widgets/{{name}}"]["patch"]
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]


async def test_crd_deletion_removes_its_objects_first(
    api: APIServer, kube: Kube, crd: dict[str, Any]
) -> None:
    held = widget("held")
    held["metadata"]["finalizers"] = ["example.test/keep"]
    await kube.post(WIDGETS, held)
    await kube.post(WIDGETS, widget("free"))
    await kube.delete(f"{CRDS}/widgets.{GROUP}")
    status, _, _ = await kube.get(f"{CRDS}/widgets.{GROUP}")
    assert status == 200  # held back by the custom resource's finalizer
    status, _, _ = await kube.post(WIDGETS, widget("new"))
    assert status == 405
    await kube.patch(f"{WIDGETS}/held", {"metadata": {"finalizers": None}})
    assert (await kube.get(f"{CRDS}/widgets.{GROUP}"))[0] == 404
    assert (await kube.get(f"/apis/{GROUP}/v1"))[0] == 404


async def test_invalid_crd_is_rejected(kube: Kube) -> None:
    bad = copy.deepcopy(WIDGET_CRD)
    bad["metadata"]["name"] = "wrong.example.test"
    del bad["spec"]["versions"][0]["schema"]
    status, body, _ = await kube.post(CRDS, bad)
    assert status == 422
    fields = {c["field"] for c in body["details"]["causes"]}
    assert {"metadata.name", "spec.versions[0].schema.openAPIV3Schema"} <= fields


async def test_crd_updates_and_multiple_versions(kube: Kube, crd: dict[str, Any]) -> None:
    updated = copy.deepcopy(WIDGET_CRD)
    updated["metadata"]["resourceVersion"] = crd["metadata"]["resourceVersion"]
    v1 = updated["spec"]["versions"][0]
    v1["storage"] = False
    v2 = copy.deepcopy(v1) | {"name": "v2", "storage": True}
    v2["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["size"]["maximum"] = 100
    updated["spec"]["versions"].append(v2)
    updated["spec"]["names"]["shortNames"] = ["wg", "wdg"]
    status, body, _ = await kube.put(f"{CRDS}/widgets.{GROUP}", updated)
    assert status == 200, body
    assert body["status"]["storedVersions"] == ["v1", "v2"]
    assert body["metadata"]["generation"] == 2
    _, groups, _ = await kube.get("/apis")
    entry = next(g for g in groups["groups"] if g["name"] == GROUP)
    assert entry["preferredVersion"]["version"] == "v2"
    _, resources, _ = await kube.get(f"/apis/{GROUP}/v2")
    assert resources["resources"][0]["shortNames"] == ["wg", "wdg"]
    v2_path = f"/apis/{GROUP}/v2/namespaces/default/widgets"
    status, obj, _ = await kube.post(v2_path, widget("big", size=50) | {"apiVersion": f"{GROUP}/v2"})
    assert status == 201 and obj["apiVersion"] == f"{GROUP}/v2"
    _, same, _ = await kube.get(f"{WIDGETS}/big")  # one store, served in every version
    assert same["apiVersion"] == f"{GROUP}/v1" and same["spec"]["size"] == 50
    status, _, _ = await kube.post(WIDGETS, widget("toobig", size=50))
    assert status == 422  # v1's schema still says at most 10


async def test_delete_collection(api: APIServer, kube: Kube, crd: dict[str, Any]) -> None:
    for name, tier in (("a", "x"), ("b", "x"), ("c", "y")):
        body = widget(name)
        body["metadata"]["labels"] = {"tier": tier}
        await kube.post(WIDGETS, body)
    status, listing, _ = await kube.delete(WIDGETS, params={"labelSelector": "tier=x"})
    assert status == 200 and listing["kind"] == "WidgetList"
    assert [o["metadata"]["name"] for o in api.objects(GROUP, "v1", "widgets")] == ["c"]
    assert api.requests_by(verb="deletecollection")[0].resource == "widgets"
