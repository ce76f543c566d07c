"""A tiny kopf 1.45 operator against the stand-in: finalizer, create handler, daemon, deletion."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf
import kubernetes
from apiserver_helpers import GROUP, widget
from kopf.testing import KopfRunner

from testapiserver import ThreadedAPIServer

FINALIZER = "example.test/kopf-test"


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kopf_operator_end_to_end(threaded: ThreadedAPIServer, tmp_path: Path) -> None:
    registry = kopf.OperatorRegistry()  # not the global one: KopfRunner re-runs handlers
    daemon_started = threading.Event()
    daemon_stopped = threading.Event()
    created: list[str] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=threaded.url, token="kopf-op", default_namespace="default")

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.watching.server_timeout = 10
        settings.posting.level = 0

    @kopf.on.create(GROUP, "v1", "widgets", registry=registry)
    def on_create(name: str, patch: kopf.Patch, logger: Any, **_: Any) -> None:
        created.append(name)
        patch.status["phase"] = "Running"
        kopf.info(
            {
                "apiVersion": f"{GROUP}/v1",
                "kind": "Widget",
                "metadata": {"name": name, "namespace": "default"},
            },
            reason="Started",
            message="flattening",
        )

    @kopf.daemon(GROUP, "v1", "widgets", registry=registry, cancellation_backoff=0.5, cancellation_timeout=1)
    def daemon(stopped: kopf.DaemonStopped, **_: Any) -> None:
        daemon_started.set()
        while not stopped:
            stopped.wait(0.1)
        daemon_stopped.set()

    path = threaded.write_kubeconfig(tmp_path / "tester.kubeconfig", user="tester")
    client = kubernetes.config.new_client_from_config(config_file=str(path))
    custom = kubernetes.client.CustomObjectsApi(client)
    args = (GROUP, "v1", "default", "widgets")

    def current() -> dict[str, Any] | None:
        return threaded.get_object(GROUP, "v1", "widgets", "w1", "default")

    with KopfRunner(
        ["run", "--standalone", "--all-namespaces", "--verbose"], registry=registry, timeout=60
    ) as runner:
        custom.create_namespaced_custom_object(*args, widget("w1"))
        wait_for(
            "the finalizer",
            lambda: FINALIZER in ((current() or {}).get("metadata", {}).get("finalizers") or []),
        )
        wait_for(
            "the create handler's status",
            lambda: (current() or {}).get("status", {}).get("phase") == "Running",
        )
        assert daemon_started.wait(10)
        assert created == ["w1"]
        custom.delete_namespaced_custom_object(*args, "w1")
        wait_for("the deletion", lambda: current() is None)
        assert daemon_stopped.is_set()

    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
    events = threaded.objects("", "v1", "events", "default")
    assert any(e["reason"] == "Started" and e["involvedObject"]["name"] == "w1" for e in events)
    kopf_writes = threaded.requests_by(user="kopf-op", writes_only=True)
    assert {(r.resource, r.subresource, r.verb) for r in kopf_writes} >= {
        ("widgets", None, "patch"),
        ("widgets", "status", "patch"),
        ("events", None, "create"),
    }
    assert not [r for r in threaded.requests_by(user="kopf-op") if (r.status or 0) >= 500]
