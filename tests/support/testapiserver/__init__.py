"""An honest in-process Kubernetes API server stand-in for tests and the demo.

There is no kube-apiserver on the machines this project runs on, so tests and the demo talk to
this server instead: a real HTTP server on 127.0.0.1 that kopf 1.45, the official ``kubernetes``
client and ``kubectl`` (1.27-1.33) use end to end, doing the bookkeeping a real server does
(resourceVersion, uid, generation, generateName, 409/410/422 answers, the status subresource,
finalizers, selectors, watches with history, discovery, OpenAPI v3, CRD schema validation and
defaulting, CEL rules), recording every request with its client identity, and failing on demand.

Why plain aiohttp and not kmock: kmock 0.8 (by kopf's author) is a request-mocking DSL whose
Kubernetes emulator keeps objects without resourceVersions, replays watches without history and
streams them as ``application/octet-stream``. Making it honest meant overriding every handler of
its emulator (create/update/delete/list/watch/discovery) and its private ``_internal`` modules,
keeping only the listener. A small aiohttp application that owns all of that is shorter, typed,
and does not depend on kmock's internals; kmock is not used.

Modules, each owning one thing:

* ``server``     -- ``APIServer`` (lifecycle, test helpers) and ``run_in_thread``;
* ``handlers``   -- URL routing, request decoding, answers, watch streams;
* ``store``      -- objects and the server's bookkeeping, deletion, built-in controllers;
* ``watch``      -- change history per resource, 410 Expired, fan-out to open watches;
* ``resources``  -- served resource types, CRD -> types, Events conversion;
* ``discovery``  -- /version, /api, /apis, APIResourceLists, OpenAPI v3;
* ``schema``     -- structural schemas: pruning, defaulting, validation, ObjectMeta checks;
* ``cel``        -- ``x-kubernetes-validations`` rules;
* ``patching``   -- merge patch, JSON patch, server-side-apply merge;
* ``selectors``  -- label and field selectors;
* ``tables``     -- ``Table`` answers for ``kubectl get``;
* ``protobuf``   -- the few protobuf bodies kubectl's ``create namespace|configmap|...`` send;
* ``recording``  -- the request log and RBAC comparison;
* ``faults``     -- injected failures;
* ``kubeconfig`` -- kubeconfig files for a user token.

Usage::

    async with APIServer() as api:                      # pytest-asyncio tests
        api.load_yaml(Path("crds/blockpull.yaml"))
        kubeconfig = api.write_kubeconfig(tmp_path / "kc", user="operator")
        ...
        assert not api.missing_permissions(role["rules"], user="operator")

    server = run_in_thread()                            # sync tests, kubectl, subprocesses
    ...
    server.stop()

    python -m testapiserver --kubeconfig kc.yaml --crd crds/x.yaml   # the demo; SIGTERM stops

Clients are told apart by the user their kubeconfig names (``write_kubeconfig(user=...)``): the
server records the ``Impersonate-User`` header (kubectl/client-go send no bearer token over plain
http, but do send the kubeconfig's ``as:``), else the bearer token, else the basic-auth name,
else ``anonymous``.

Known limits (a real cluster still has to prove these):

* No authentication or authorization: any credential is accepted and only recorded.
* Server-side apply is a merge without managedFields: no conflicts between field managers
  (``force`` is irrelevant); a manager's fields it stops applying are removed only when their
  live value is still what it applied last. Strategic merge patch is answered 415 for custom
  resources (as a real server does) and approximated by a JSON merge patch for built-ins.
* CRD versions share one store with no conversion but ``apiVersion``; ``/scale`` is not served.
* Schema ``format:`` keywords are not checked; CEL rules needing Kubernetes' CEL libraries are
  skipped (listed in ``APIServer.skipped_rules``); without ``celpy`` only ``self == oldSelf``.
* Built-in kinds other than Namespaces, Events and CRDs are stored without validation and
  without controllers (no Pods run, no DaemonSet rolls out).
* Garbage collection and namespace/CRD cleanup run synchronously right after the triggering
  request; foreground deletion acts as background deletion.
* Discovery is the legacy (unaggregated) form; OpenAPI v2 is not served (kubectl >= 1.27 uses
  v3; an older kubectl needs ``--validate=false`` for ``apply``). Protobuf request bodies are
  understood only for Namespace, ConfigMap, Secret and ServiceAccount (kubectl's generators);
  answers are always JSON.
* ``continue`` tokens page over the current state, not a consistent snapshot; lists ignore
  ``resourceVersion``; watch history is bounded per resource (``history_size``).
"""

from testapiserver.errors import APIError, Cause
from testapiserver.faults import FailureRule
from testapiserver.kubeconfig import kubeconfig
from testapiserver.recording import (
    Permission,
    RecordedRequest,
    filter_requests,
    missing_permissions,
    rules_allow,
    used_permissions,
)
from testapiserver.server import APIServer, ThreadedAPIServer, run_in_thread

__all__ = [
    "APIError",
    "APIServer",
    "Cause",
    "FailureRule",
    "Permission",
    "RecordedRequest",
    "ThreadedAPIServer",
    "filter_requests",
    "kubeconfig",
    "missing_permissions",
    "rules_allow",
    "run_in_thread",
    "used_permissions",
]
