"""The agent's few Kubernetes API calls, on the official client, off the event loop.

Owns: patching a BlockPull's status subresource, posting Events about it, deleting it (TTL),
and mapping API errors into the agent's error tree. The official client is synchronous, so
every call runs in a worker thread of a small pool (a lane); the loop never blocks on the API.

The lanes set priorities for a busy API server (a burst of hundreds of new objects, each one
a finalizer patch by kopf, a first status, a Running status and an Event): transitions
(Running, Completed, Failed) and deletes have four threads and never queue behind the rest;
progress writes and reads have four; first statuses one, where those that a transition
overtakes are withdrawn unsent; Events one, so the audit trail never crowds out the state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from blockpull.errors import BlockPullError, InvalidSpec

GROUP, VERSION, PLURAL, KIND = "blockpull.dev", "v1alpha1", "blockpulls", "BlockPull"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectRef:
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ObjectRef:
        meta = body["metadata"]
        return cls(str(meta["namespace"]), str(meta["name"]), str(meta["uid"]))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class KubeAPIError(BlockPullError):
    """The Kubernetes API did not take a call; retried, never mistaken for a VM problem (it
    is not a `TransientError`, which means "the VM is not ready")."""

    retryable = True

    reason = "APIUnavailable"


class Gone(KubeAPIError):
    """The object no longer exists (or is another object by now: uid mismatch)."""

    reason = "Gone"


class QueuedWrite:
    """A write its caller may take back until a worker thread begins it.

    A status write carries the whole status, so a newer one supersedes an older one that has
    not left the agent yet: in a burst of new objects the lanes queue, and sending the older
    write first would only delay the newer one behind it (and cost the API a request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the loop withdraws, a worker thread begins
        self._state = "queued"

    def withdraw(self) -> bool:
        """True if the write will never be sent; False once it has begun (wait for it)."""
        with self._lock:
            if self._state == "queued":
                self._state = "withdrawn"
            return self._state == "withdrawn"

    def begin(self) -> bool:
        with self._lock:
            if self._state == "queued":
                self._state = "begun"
            return self._state == "begun"


class KubeAPI:
    """The agent's API calls. One instance per agent, shared by all objects."""

    def __init__(self, api_client: kubernetes.client.ApiClient, *, component: str, node_name: str) -> None:
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._component = component
        self._node_name = node_name
        #: Count of write calls, per kind: the benchmark and tests read it.
        self.writes: dict[str, int] = {"status": 0, "event": 0, "delete": 0}
        # The lanes (see the module's docstring).
        self._urgent = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kube-urgent")
        self._routine = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kube")
        self._first = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kube-first")
        self._events = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kube-events")

    async def patch_status(
        self,
        ref: ObjectRef,
        status: Mapping[str, Any],
        *,
        urgent: bool = True,
        queued: QueuedWrite | None = None,
    ) -> bool:
        """Replace the status fields we own (JSON merge patch on the status subresource).
        A write that may be withdrawn (`queued`: a first status) goes through the first-status
        lane; False if it was withdrawn before a worker began it: nothing was sent."""
        body = {"metadata": {"uid": ref.uid}, "status": status}
        patch = self._custom.patch_namespaced_custom_object_status

        def send(*args: Any, **kwargs: Any) -> bool:
            if queued is not None and not queued.begin():
                return False
            patch(*args, **kwargs)
            return True

        sent = True
        try:
            sent = bool(await self._call(
                send, GROUP, VERSION, ref.namespace, PLURAL, ref.name, body,
                lane=self._first if queued is not None else self._urgent if urgent else self._routine,
            ))  # fmt: skip
        finally:
            if sent:  # attempts, failed ones included
                self.writes["status"] += 1
        return sent

    async def post_event(self, ref: ObjectRef, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the object; losing one is logged, never fatal."""
        now = datetime.datetime.now(datetime.UTC)
        event = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(generate_name=f"{ref.name}.", namespace=ref.namespace),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=KIND,
                name=ref.name,
                namespace=ref.namespace,
                uid=ref.uid,
            ),
            reason=reason,
            message=message[:1024],
            type=kind,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=kubernetes.client.V1EventSource(component=self._component, host=self._node_name),
            reporting_component=self._component,
            reporting_instance=self._node_name,
        )
        self.writes["event"] += 1
        try:
            await self._call(self._core.create_namespaced_event, ref.namespace, event, lane=self._events)
        except KubeAPIError as exc:
            log.warning("could not post event %s on %s: %s", reason, ref, exc)

    async def object_uids(self, namespace: str) -> set[str]:
        """The uids of the BlockPulls in `namespace` (to tell a leftover job's object is gone)."""
        listing = await self._call(
            self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, lane=self._routine
        )
        return {str(item["metadata"]["uid"]) for item in listing.get("items", [])}

    async def node_objects(self, namespace: str | None) -> list[dict[str, Any]]:
        """This node's BlockPulls (of `namespace`, or of all namespaces), as the API has them."""
        selector = f"spec.nodeName={self._node_name}"
        if namespace is None:
            listing = await self._call(
                self._custom.list_cluster_custom_object,
                GROUP, VERSION, PLURAL, field_selector=selector, lane=self._routine,
            )  # fmt: skip
        else:
            listing = await self._call(
                self._custom.list_namespaced_custom_object,
                GROUP, VERSION, namespace, PLURAL, field_selector=selector, lane=self._routine,
            )  # fmt: skip
        return list(listing.get("items", []))

    async def delete(self, ref: ObjectRef) -> None:
        """Delete the object, only if it is still the same object (uid precondition)."""
        self.writes["delete"] += 1
        body = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=ref.uid))
        await self._call(
            self._custom.delete_namespaced_custom_object,
            GROUP, VERSION, ref.namespace, PLURAL, ref.name, body=body, lane=self._urgent,
        )  # fmt: skip

    async def _call(
        self, method: Any, *args: Any, lane: concurrent.futures.ThreadPoolExecutor, **kwargs: Any
    ) -> Any:
        call = functools.partial(method, *args, _request_timeout=30, **kwargs)
        try:
            return await asyncio.get_running_loop().run_in_executor(lane, call)
        except ApiException as exc:
            if exc.status in (404, 409, 410) and _gone(exc):
                raise Gone(f"{exc.status} {exc.reason}") from exc
            raise KubeAPIError(f"Kubernetes API answered {exc.status} {exc.reason}: {exc.body!r}") from exc
        except OSError as exc:  # urllib3 connection errors are OSError subclasses
            raise KubeAPIError(f"Kubernetes API unreachable: {exc}") from exc


def _gone(exc: ApiException) -> bool:
    # 404: deleted. 409 on our uid precondition: a new object with the same name.
    return (
        exc.status == 404 or "Precondition failed" in str(exc.body) or "UID in precondition" in str(exc.body)
    )


def api_client_from_environment() -> kubernetes.client.ApiClient:
    """The official client, from the service account in a pod or from KUBECONFIG; a broken
    configuration is one clear line (InvalidSpec), not the client's traceback."""
    kubeconfig = os.environ.get("KUBECONFIG")
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
            return kubernetes.client.ApiClient()
        # Pass the path explicitly: kubernetes.config reads $KUBECONFIG at import time.
        return kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call,no-any-return]
            config_file=kubeconfig
        )
    except Exception as exc:  # the client raises ConfigException, OSError, YAML errors...
        where = (
            f"KUBECONFIG={kubeconfig}" if kubeconfig else "the in-cluster service account or ~/.kube/config"
        )
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidSpec(f"cannot load the Kubernetes client configuration from {where}: {detail}") from exc
