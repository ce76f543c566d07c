"""Fixtures for testing the API server stand-in on its own (see operator/testapiserver)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from apiserver_helpers import WIDGET_CRD, Kube

from testapiserver import APIServer, ThreadedAPIServer, run_in_thread


@pytest.fixture
async def api() -> AsyncIterator[APIServer]:
    async with APIServer() as server:
        yield server


@pytest.fixture
async def kube(api: APIServer) -> AsyncIterator[Kube]:
    async with aiohttp.ClientSession() as session:
        yield Kube(session, api.url)


@pytest.fixture
async def crd(api: APIServer, kube: Kube) -> dict[str, Any]:
    status, body, _ = await kube.post(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", copy.deepcopy(WIDGET_CRD)
    )
    assert status == 201, body
    return dict(body)


@pytest.fixture
def threaded() -> Iterator[ThreadedAPIServer]:
    server = run_in_thread()
    try:
        server.create(copy.deepcopy(WIDGET_CRD))
        yield server
    finally:
        server.stop()
