"""Test-facing tooling: request recording, RBAC comparison, fault injection, kubeconfig, CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from apiserver_helpers import GROUP, WIDGET_CRD, WIDGETS, Kube, widget

from testapiserver import APIServer, Permission, rules_allow

SUPPORT_DIR = Path(__file__).resolve().parents[1] / "support"


async def test_requests_are_recorded_with_rbac_attributes(
    api: APIServer, kube: Kube, crd: dict[str, Any]
) -> None:
    agent = kube.as_user("agent-n1")
    await agent.post(WIDGETS, widget("w1"))
    await agent.patch(f"{WIDGETS}/w1/status", {"status": {"phase": "x"}})
    await agent.get(f"{WIDGETS}/w1")
    await agent.get(WIDGETS, params={"labelSelector": "a=b"})
    await agent.delete(f"{WIDGETS}/w1")
    await kube.get("/version")
    writes = api.requests_by(user="agent-n1", writes_only=True)
    assert [(r.verb, r.resource, r.subresource) for r in writes] == [
        ("create", "widgets", None),
        ("patch", "widgets", "status"),
        ("delete", "widgets", None),
    ]
    first = writes[0]
    assert (first.group, first.version, first.namespace, first.status) == (GROUP, "v1", "default", 201)
    assert first.body["metadata"]["name"] == "w1"
    listing = api.requests_by(user="agent-n1", verb="list")[0]
    assert listing.query == {"labelSelector": "a=b"}
    version = api.requests_by(user="tester")[-1]
    assert (version.verb, version.resource, version.is_write) == ("get", None, False)
    assert api.used_permissions("agent-n1") == {
        Permission(GROUP, "widgets", "create"),
        Permission(GROUP, "widgets/status", "patch"),
        Permission(GROUP, "widgets", "get"),
        Permission(GROUP, "widgets", "list"),
        Permission(GROUP, "widgets", "delete"),
    }
    rules = [
        {
            "apiGroups": [GROUP],
            "resources": ["widgets"],
            "verbs": ["get", "list", "watch", "create", "delete"],
        }
    ]
    assert api.missing_permissions(rules, "agent-n1") == {Permission(GROUP, "widgets/status", "patch")}
    assert rules_allow(
        [{"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["patch"]}],
        Permission(GROUP, "widgets/status", "patch"),
    )


async def test_anonymous_and_impersonated_users(api: APIServer, kube: Kube) -> None:
    async with kube.session.get(api.url + "/api") as resp:
        assert resp.status == 200
    await kube.get("/api", headers={"Impersonate-User": "someone"})
    assert [r.user for r in api.requests[-2:]] == ["anonymous", "someone"]


async def test_injected_failures(api: APIServer, kube: Kube, crd: dict[str, Any]) -> None:
    rule = api.inject_failures(verb="create", resource="widgets", count=2, status=500)
    for _ in range(2):
        status, body, _ = await kube.post(WIDGETS, widget("w1"))
        assert (status, body["reason"], body["kind"]) == (500, "InternalError", "Status")
    assert api.objects(GROUP, "v1", "widgets") == []
    status, _, _ = await kube.post(WIDGETS, widget("w1"))
    assert status == 201 and rule.exhausted and len(rule.hits) == 2
    assert api.requests_by(verb="create", resource="widgets")[0].injected

    api.inject_failures(lambda r: r.name == "w1" and r.verb == "patch", status=409, message="try again")
    status, body, _ = await kube.patch(f"{WIDGETS}/w1", {"spec": {"size": 4}})
    assert (status, body["reason"], body["message"]) == (409, "Conflict", "try again")
    assert (await kube.patch(f"{WIDGETS}/w1", {"spec": {"size": 4}}))[0] == 200

    api.inject_failures(user="tester", count=None, status=429, retry_after=1)
    status, _, headers = await kube.get(WIDGETS)
    assert status == 429 and headers["Retry-After"] == "1"
    api.clear_failures()
    loop = asyncio.get_running_loop()
    api.inject_failures(status=None, delay=0.3, verb="get")
    started = loop.time()
    status, _, _ = await kube.get(f"{WIDGETS}/w1")
    assert status == 200 and loop.time() - started >= 0.3


async def test_kubeconfig_file(api: APIServer, tmp_path: Path) -> None:
    path = api.write_kubeconfig(tmp_path / "sub" / "kc.yaml", user="agent-n2", namespace="ops")
    config = yaml.safe_load(path.read_text())
    assert config["clusters"][0]["cluster"]["server"] == api.url
    assert config["users"][0]["user"]["token"] == "agent-n2"
    assert config["contexts"][0]["context"]["namespace"] == "ops"


def test_command_line_server(tmp_path: Path) -> None:
    crd_file = tmp_path / "crd.yaml"
    crd_file.write_text(yaml.safe_dump(WIDGET_CRD))
    kubeconfig = tmp_path / "kc.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testapiserver",
            "--port",
            "0",
            "--kubeconfig",
            str(kubeconfig),
            "--crd",
            str(crd_file),
            "--create-namespace",
            "demo",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"] == url
        with urllib.request.urlopen(f"{url}/apis/{GROUP}/v1") as resp:
            assert b"widgets/status" in resp.read()
        with urllib.request.urlopen(f"{url}/api/v1/namespaces/demo") as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
