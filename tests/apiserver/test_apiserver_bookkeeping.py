"""resourceVersion/uid/generation bookkeeping, conflicts, patches and the status subresource."""

from __future__ import annotations

import copy
from typing import Any

from apiserver_helpers import GADGET_CRD, GROUP, WIDGETS, Kube, widget

from testapiserver import APIServer


async def test_create_sets_server_fields(kube: Kube, crd: dict[str, Any]) -> None:
    status, obj, _ = await kube.post(WIDGETS, widget("w1"))
    assert status == 201
    meta = obj["metadata"]
    assert meta["namespace"] == "default"
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    assert int(meta["resourceVersion"]) > int(crd["metadata"]["resourceVersion"])
    assert "managedFields" not in meta
    assert obj["spec"]["size"] == 3  # defaulted from the schema


async def test_resource_versions_increase_cluster_wide(kube: Kube, crd: dict[str, Any]) -> None:
    _, a, _ = await kube.post(WIDGETS, widget("a"))
    _, ns, _ = await kube.post("/api/v1/namespaces", {"metadata": {"name": "other"}})
    _, b, _ = await kube.post(WIDGETS, widget("b"))
    rvs = [int(o["metadata"]["resourceVersion"]) for o in (a, ns, b)]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3
    status, listing, _ = await kube.get(WIDGETS)
    assert status == 200
    assert listing["kind"] == "WidgetList" and listing["apiVersion"] == f"{GROUP}/v1"
    assert int(listing["metadata"]["resourceVersion"]) >= rvs[-1]
    assert [i["metadata"]["name"] for i in listing["items"]] == ["a", "b"]


async def test_generate_name_twice(kube: Kube, crd: dict[str, Any]) -> None:
    body = widget("x")
    del body["metadata"]["name"]
    body["metadata"]["generateName"] = "gen-"
    _, first, _ = await kube.post(WIDGETS, body)
    _, second, _ = await kube.post(WIDGETS, body)
    names = {first["metadata"]["name"], second["metadata"]["name"]}
    assert len(names) == 2 and all(n.startswith("gen-") and len(n) == 9 for n in names)


async def test_events_with_same_generate_name_both_succeed(kube: Kube) -> None:
    event = {
        "metadata": {"generateName": "kopf-event-"},
        "reason": "Tested",
        "message": "m",
        "type": "Normal",
        "involvedObject": {"kind": "Widget", "name": "w1", "namespace": "default"},
    }
    path = "/api/v1/namespaces/default/events"
    assert (await kube.post(path, event))[0] == 201
    assert (await kube.post(path, event))[0] == 201
    _, listing, _ = await kube.get(path)
    assert len(listing["items"]) == 2
    assert "generation" not in listing["items"][0]["metadata"]  # events have no generation
    # The same events through events.k8s.io/v1, renamed as a real server serves them.
    _, new_style, _ = await kube.get("/apis/events.k8s.io/v1/namespaces/default/events")
    assert new_style["items"][0]["regarding"]["name"] == "w1"
    assert new_style["items"][0]["note"] == "m"


async def test_errors_are_status_objects(kube: Kube, crd: dict[str, Any]) -> None:
    status, body, _ = await kube.get(f"{WIDGETS}/missing")
    assert status == 404
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'widgets.{GROUP} "missing" not found',
        "reason": "NotFound",
        "code": 404,
        "details": {"name": "missing", "group": GROUP, "kind": "widgets"},
    }
    await kube.post(WIDGETS, widget("w1"))
    status, body, _ = await kube.post(WIDGETS, widget("w1"))
    assert (status, body["reason"], body["details"]["name"]) == (409, "AlreadyExists", "w1")
    status, body, _ = await kube.get("/apis/nope.test/v1/things")
    assert (status, body["kind"], body["reason"]) == (404, "Status", "NotFound")


async def test_create_needs_an_existing_active_namespace(kube: Kube, crd: dict[str, Any]) -> None:
    path = f"/apis/{GROUP}/v1/namespaces/ghost/widgets"
    status, body, _ = await kube.post(path, widget("w1"))
    assert (status, body["message"]) == (404, 'namespaces "ghost" not found')


async def test_stale_resource_version_is_a_conflict(kube: Kube, crd: dict[str, Any]) -> None:
    _, obj, _ = await kube.post(WIDGETS, widget("w1"))
    stale = copy.deepcopy(obj)
    _, fresh, _ = await kube.patch(f"{WIDGETS}/w1", {"spec": {"size": 4}})
    assert fresh["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]
    stale["spec"]["size"] = 5
    status, body, _ = await kube.put(f"{WIDGETS}/w1", stale)
    assert (status, body["reason"]) == (409, "Conflict")
    assert "the object has been modified" in body["message"]
    # The same through a merge patch carrying the stale resourceVersion.
    status, _, _ = await kube.patch(
        f"{WIDGETS}/w1",
        {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "spec": {"size": 6}},
    )
    assert status == 409
    # PUT of a custom resource needs a resourceVersion at all.
    del stale["metadata"]["resourceVersion"]
    status, body, _ = await kube.put(f"{WIDGETS}/w1", stale)
    assert (status, body["reason"]) == (422, "Invalid")


async def test_failed_json_patch_test_is_422(kube: Kube, crd: dict[str, Any]) -> None:
    _, obj, _ = await kube.post(WIDGETS, widget("w1"))
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x.test/f"]},
    ]
    status, body, _ = await kube.patch(f"{WIDGETS}/w1", ops, kind="json")
    assert (status, body["kind"]) == (422, "Status")
    ops[0]["value"] = obj["metadata"]["resourceVersion"]
    status, patched, _ = await kube.patch(f"{WIDGETS}/w1", ops, kind="json")
    assert status == 200 and patched["metadata"]["finalizers"] == ["x.test/f"]
    status, _, _ = await kube.patch(f"{WIDGETS}/w1", [{"op": "remove", "path": "/spec/nope"}], kind="json")
    assert status == 422


async def test_generation_and_noop_writes(kube: Kube, crd: dict[str, Any]) -> None:
    _, obj, _ = await kube.post(WIDGETS, widget("w1"))
    _, labelled, _ = await kube.patch(f"{WIDGETS}/w1", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 1  # metadata changes do not bump generation
    assert labelled["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]
    _, resized, _ = await kube.patch(f"{WIDGETS}/w1", {"spec": {"size": 7}})
    assert resized["metadata"]["generation"] == 2
    _, same, _ = await kube.patch(f"{WIDGETS}/w1", {"spec": {"size": 7}})
    assert same["metadata"]["resourceVersion"] == resized["metadata"]["resourceVersion"]


async def test_status_subresource_is_separate(kube: Kube, crd: dict[str, Any]) -> None:
    body = widget("w1")
    body["status"] = {"phase": "Forged"}
    _, obj, _ = await kube.post(WIDGETS, body)
    assert "status" not in obj  # ignored on create
    _, obj, _ = await kube.patch(f"{WIDGETS}/w1", {"status": {"phase": "Ignored"}, "spec": {"size": 2}})
    assert "status" not in obj and obj["spec"]["size"] == 2
    _, obj, _ = await kube.patch(
        f"{WIDGETS}/w1/status",
        {"status": {"phase": "Running"}, "spec": {"size": 9}, "metadata": {"labels": {"x": "y"}}},
    )
    assert obj["status"] == {"phase": "Running"}
    assert obj["spec"]["size"] == 2 and "labels" not in obj["metadata"]
    assert obj["metadata"]["generation"] == 2  # status does not bump generation
    _, got, _ = await kube.get(f"{WIDGETS}/w1/status")
    assert got["status"]["phase"] == "Running"
    got["status"]["phase"] = "Done"
    status, put, _ = await kube.put(f"{WIDGETS}/w1/status", got)
    assert status == 200 and put["status"]["phase"] == "Done"


async def test_without_status_subresource_status_is_spec_like(kube: Kube) -> None:
    await kube.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", copy.deepcopy(GADGET_CRD))
    path = f"/apis/{GROUP}/v1/gadgets"
    _, obj, _ = await kube.post(
        path, {"apiVersion": f"{GROUP}/v1", "kind": "Gadget", "metadata": {"name": "g"}, "status": {"a": 1}}
    )
    assert obj["status"] == {"a": 1} and "namespace" not in obj["metadata"]
    _, obj, _ = await kube.patch(f"{path}/g", {"status": {"a": 2}})
    assert obj["metadata"]["generation"] == 2
    status, _, _ = await kube.get(f"{path}/g/status")
    assert status == 404


async def test_strategic_merge_is_refused_for_custom_resources(kube: Kube, crd: dict[str, Any]) -> None:
    await kube.post(WIDGETS, widget("w1"))
    status, body, _ = await kube.patch(f"{WIDGETS}/w1", {"spec": {"size": 2}}, kind="strategic")
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")
    status, ns, _ = await kube.patch(
        "/api/v1/namespaces/default", {"metadata": {"labels": {"a": "b"}}}, kind="strategic"
    )
    assert status == 200 and ns["metadata"]["labels"] == {"a": "b"}


async def test_server_side_apply_creates_and_merges(kube: Kube, crd: dict[str, Any]) -> None:
    manifest = (
        f"apiVersion: {GROUP}/v1\nkind: Widget\nmetadata:\n  name: w1\n"
        "  labels: {a: '1'}\nspec:\n  disk: /d\n  mode: fast\n"
    )
    params = {"fieldManager": "tester"}
    status, obj, _ = await kube.patch(f"{WIDGETS}/w1", manifest, kind="apply", params=params)
    assert status == 201 and obj["spec"] == {"disk": "/d", "mode": "fast", "size": 3}
    await kube.patch(f"{WIDGETS}/w1", {"metadata": {"labels": {"b": "2"}}})
    manifest = manifest.replace("  mode: fast\n", "  size: 5\n")
    status, obj, _ = await kube.patch(f"{WIDGETS}/w1", manifest, kind="apply", params=params)
    assert status == 200
    assert obj["spec"] == {"disk": "/d", "size": 5}  # mode: no longer applied by this manager
    assert obj["metadata"]["labels"] == {"a": "1", "b": "2"}  # other writers' fields stay
    status, _, _ = await kube.patch(f"{WIDGETS}/w1", manifest, kind="apply")
    assert status == 400  # fieldManager is required


async def test_dry_run_changes_nothing(api: APIServer, kube: Kube, crd: dict[str, Any]) -> None:
    status, obj, _ = await kube.post(WIDGETS, widget("w1"), params={"dryRun": "All"})
    assert status == 201 and obj["spec"]["size"] == 3
    assert api.objects(GROUP, "v1", "widgets") == []


async def test_list_paging(kube: Kube, crd: dict[str, Any]) -> None:
    for name in "abcde":
        await kube.post(WIDGETS, widget(name))
    seen: list[str] = []
    params = {"limit": "2"}
    while True:
        _, page, _ = await kube.get(WIDGETS, params=params)
        seen += [i["metadata"]["name"] for i in page["items"]]
        if not page["metadata"].get("continue"):
            break
        params = {"limit": "2", "continue": page["metadata"]["continue"]}
    assert seen == list("abcde")


async def test_table_answers_for_kubectl_get(kube: Kube, crd: dict[str, Any]) -> None:
    await kube.post(WIDGETS, widget("w1", size=4))
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    _, table, _ = await kube.get(WIDGETS, headers={"Accept": accept})
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Size", "Phase", "Age"]
    cells = table["rows"][0]["cells"]
    assert cells[:3] == ["w1", 4, None] and cells[3].endswith("s")
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
