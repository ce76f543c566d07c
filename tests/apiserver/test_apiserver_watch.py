"""Watches: resourceVersion semantics, 410 Expired, timeouts, bookmarks, selectors."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from apiserver_helpers import WIDGETS, Kube, WatchStream, widget

from testapiserver import APIServer


async def open_watch(kube: Kube, path: str, **params: str) -> tuple[aiohttp.ClientResponse, WatchStream]:
    resp = await kube.session.get(
        kube.url + path, params={"watch": "true", **params}, headers={"Authorization": f"Bearer {kube.user}"}
    )
    assert resp.status == 200
    assert resp.content_type == "application/json"
    return resp, WatchStream(resp)


async def test_watch_from_resource_version_replays_only_newer(kube: Kube, crd: dict[str, Any]) -> None:
    _, a, _ = await kube.post(WIDGETS, widget("a"))
    _, b, _ = await kube.post(WIDGETS, widget("b"))
    await kube.patch(f"{WIDGETS}/a", {"spec": {"size": 5}})
    resp, stream = await open_watch(kube, WIDGETS, resourceVersion=b["metadata"]["resourceVersion"])
    async with resp:
        event = await stream.next()
        assert event is not None
        assert (event["type"], event["object"]["metadata"]["name"]) == ("MODIFIED", "a")
        assert event["object"]["spec"]["size"] == 5
        assert await stream.quiet()  # nothing older is replayed
        await kube.delete(f"{WIDGETS}/b")
        event = await stream.next()
        assert event is not None
        assert (event["type"], event["object"]["metadata"]["name"]) == ("DELETED", "b")
        assert int(event["object"]["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])


async def test_watch_without_resource_version_starts_with_added(kube: Kube, crd: dict[str, Any]) -> None:
    await kube.post(WIDGETS, widget("a"))
    for params in ({}, {"resourceVersion": "0"}):
        resp, stream = await open_watch(kube, WIDGETS, **params)
        async with resp:
            event = await stream.next()
            assert event is not None and event["type"] == "ADDED"
            assert await stream.quiet()


async def test_too_old_resource_version_is_410(kube: Kube, crd: dict[str, Any]) -> None:
    api_small = APIServer(history_size=2)
    async with api_small:
        small = Kube(kube.session, api_small.url)
        await small.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            crd | {"metadata": {"name": crd["metadata"]["name"]}},
        )
        _, first, _ = await small.post(WIDGETS, widget("a"))
        for size in (2, 3, 4, 5):
            await small.patch(f"{WIDGETS}/a", {"spec": {"size": size}})
        resp, stream = await open_watch(small, WIDGETS, resourceVersion=first["metadata"]["resourceVersion"])
        async with resp:
            events = await stream.rest()
        assert len(events) == 1 and events[0]["type"] == "ERROR"
        status = events[0]["object"]
        assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")


async def test_expire_watches_closes_streams_and_forgets(
    api: APIServer, kube: Kube, crd: dict[str, Any]
) -> None:
    _, obj, _ = await kube.post(WIDGETS, widget("a"))
    resp, stream = await open_watch(kube, WIDGETS, resourceVersion=obj["metadata"]["resourceVersion"])
    async with resp:
        await asyncio.sleep(0.05)
        assert api.open_watches == 1
        api.expire_watches()
        assert await stream.rest() == []  # closed cleanly by the server
    resp, stream = await open_watch(kube, WIDGETS, resourceVersion=obj["metadata"]["resourceVersion"])
    async with resp:
        events = await stream.rest()
    assert events[0]["object"]["code"] == 410
    # A fresh list gives a resourceVersion that is watchable again.
    _, listing, _ = await kube.get(WIDGETS)
    resp, stream = await open_watch(kube, WIDGETS, resourceVersion=listing["metadata"]["resourceVersion"])
    async with resp:
        assert await stream.quiet()


async def test_timeout_seconds_and_bookmarks(kube: Kube, crd: dict[str, Any]) -> None:
    await kube.post(WIDGETS, widget("a"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp, stream = await open_watch(kube, WIDGETS, timeoutSeconds="1", allowWatchBookmarks="true")
    async with resp:
        events = await stream.rest()
    assert 0.9 <= loop.time() - started < 3
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    bookmark = events[-1]["object"]
    assert bookmark["kind"] == "Widget" and bookmark["metadata"]["resourceVersion"]


async def test_send_initial_events_ends_with_a_bookmark(kube: Kube, crd: dict[str, Any]) -> None:
    await kube.post(WIDGETS, widget("a"))
    resp, stream = await open_watch(
        kube,
        WIDGETS,
        sendInitialEvents="true",
        allowWatchBookmarks="true",
        resourceVersionMatch="NotOlderThan",
    )
    async with resp:
        first, second = await stream.next(), await stream.next()
    assert first is not None and second is not None
    assert first["type"] == "ADDED" and second["type"] == "BOOKMARK"
    annotations = second["object"]["metadata"]["annotations"]
    assert annotations == {"k8s.io/initial-events-end": "true"}


async def test_selectors_turn_changes_into_added_and_deleted(kube: Kube, crd: dict[str, Any]) -> None:
    body = widget("a")
    body["metadata"]["labels"] = {"node": "n1"}
    _, obj, _ = await kube.post(WIDGETS, body)
    resp, stream = await open_watch(
        kube, WIDGETS, labelSelector="node=n2", resourceVersion=obj["metadata"]["resourceVersion"]
    )
    async with resp:
        await kube.patch(f"{WIDGETS}/a", {"metadata": {"labels": {"node": "n2"}}})
        event = await stream.next()
        assert event is not None and event["type"] == "ADDED"
        await kube.patch(f"{WIDGETS}/a", {"spec": {"size": 4}})
        event = await stream.next()
        assert event is not None and event["type"] == "MODIFIED"
        await kube.patch(f"{WIDGETS}/a", {"metadata": {"labels": {"node": "n3"}}})
        event = await stream.next()
        assert event is not None and event["type"] == "DELETED"
        await kube.post(WIDGETS, widget("unlabelled"))
        assert await stream.quiet()


async def test_watch_is_namespace_scoped(kube: Kube, crd: dict[str, Any]) -> None:
    await kube.post("/api/v1/namespaces", {"metadata": {"name": "other"}})
    resp, stream = await open_watch(kube, WIDGETS)
    async with resp:
        await kube.post("/apis/example.test/v1/namespaces/other/widgets", widget("x"))
        assert await stream.quiet()
    resp, stream = await open_watch(kube, "/apis/example.test/v1/widgets")
    async with resp:
        event = await stream.next()
        assert event is not None and event["object"]["metadata"]["namespace"] == "other"


@pytest.mark.parametrize("bad", ["abc"])
async def test_bad_resource_version_is_400(kube: Kube, crd: dict[str, Any], bad: str) -> None:
    status, body, _ = await kube.get(WIDGETS, params={"watch": "1", "resourceVersion": bad})
    assert (status, body["reason"]) == (400, "BadRequest")
