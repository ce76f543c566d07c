"""The agent's installation is hardened and least-privilege, and agrees with the image.

Checked on the rendered `kubectl kustomize deploy/`, i.e. on what a cluster would receive.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from .support import REPO, Doc, build_context_files, one

NAMESPACE = "blockpull-system"
AGENT = "blockpull-agent"
UID = GID = 10001
SOCKET_GROUP = 2376
SOCKET_TEMPLATE = "/run/blockpull/{namespace}/{vm}.qmp"

#: The exact permissions (apiGroup, resource) -> verbs; any change must be deliberate.
EXPECTED_RULES = {
    ("blockpull.dev", "blockpulls"): ["list", "watch", "patch", "delete"],
    ("blockpull.dev", "blockpulls/status"): ["patch"],
    ("", "events"): ["create"],
    ("apiextensions.k8s.io", "customresourcedefinitions"): ["list", "watch"],
}


@pytest.fixture(scope="module")
def pod(rendered: list[Doc]) -> Doc:
    daemonset = one(rendered, "DaemonSet")
    return daemonset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod: Doc) -> Doc:
    (container,) = pod["containers"]
    return container


def _env(container: Doc) -> dict[str, Any]:
    return {item["name"]: item for item in container["env"]}


# --- RBAC ------------------------------------------------------------------------------------


def test_cluster_role_is_exactly_what_the_agent_uses(rendered: list[Doc]) -> None:
    rules: dict[tuple[str, str], list[str]] = {}
    for rule in one(rendered, "ClusterRole")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs"
        (group,) = rule["apiGroups"]
        for resource in rule["resources"]:
            assert (group, resource) not in rules, "one rule per resource, so it is easy to prune"
            rules[group, resource] = rule["verbs"]
    assert rules == EXPECTED_RULES


def test_no_wildcards_and_no_write_access_to_anything_else(rendered: list[Doc]) -> None:
    for rule in one(rendered, "ClusterRole")["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key]
        assert not {"escalate", "bind", "impersonate", "update", "deletecollection"} & set(rule["verbs"])


def test_binding_grants_the_role_to_the_agents_service_account(rendered: list[Doc]) -> None:
    binding = one(rendered, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": one(rendered, "ClusterRole")["metadata"]["name"],
    }
    account = one(rendered, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": AGENT, "namespace": account["metadata"]["namespace"]}
    ]


def test_every_rbac_verb_is_explained() -> None:
    """rbac.yaml says why each verb is there (one commented verb per line)."""
    lines = (REPO / "deploy" / "rbac.yaml").read_text().splitlines()
    verbs = [i for i, line in enumerate(lines) if re.fullmatch(r"\s+- [a-z]+", line)]
    assert len(verbs) == sum(len(v) for v in EXPECTED_RULES.values())
    for index in verbs:
        above = lines[index - 1].strip()
        assert above.startswith("#") or re.fullmatch(r"- [a-z]+", above), lines[index]


# --- the DaemonSet ---------------------------------------------------------------------------


def test_runs_on_every_node_as_the_agent(rendered: list[Doc], pod: Doc) -> None:
    daemonset = one(rendered, "DaemonSet")
    assert daemonset["metadata"]["namespace"] == NAMESPACE
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["serviceAccountName"] == AGENT
    assert pod["automountServiceAccountToken"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


def test_pod_security_context(pod: Doc) -> None:
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": GID,
        "supplementalGroups": [SOCKET_GROUP],
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_container_security_context(container: Doc) -> None:
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_starts_the_agent_with_its_environment(container: Doc) -> None:
    assert container["command"] == ["blockpull-agent"]
    assert "args" not in container
    env = _env(container)
    assert env["NODE_NAME"] == {
        "name": "NODE_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
    }
    assert env["BLOCKPULL_SOCKET_TEMPLATE"]["value"] == SOCKET_TEMPLATE
    assert "BLOCKPULL_WATCH_NAMESPACE" not in env, "the DaemonSet serves all namespaces"


def test_socket_directory_is_the_hosts(pod: Doc, container: Doc) -> None:
    fixed_directory = SOCKET_TEMPLATE.split("{", 1)[0].rstrip("/")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    mount = mounts[fixed_directory]
    assert volumes[mount["name"]]["hostPath"] == {
        "path": fixed_directory,
        "type": "DirectoryOrCreate",
    }
    assert mount["readOnly"] is True
    assert mount["mountPropagation"] == "HostToContainer"
    # The only writable place: a size-bounded emptyDir at /tmp.
    assert volumes[mounts["/tmp"]["name"]] == {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}
    assert set(mounts) == {fixed_directory, "/tmp"}


def test_liveness_probe_hits_the_agents_health_endpoint(container: Doc) -> None:
    probe = container["livenessProbe"]
    port = {p["name"]: p for p in container["ports"]}["healthz"]
    assert port == {"name": "healthz", "containerPort": 8080, "protocol": "TCP"}
    assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert _env(container)["BLOCKPULL_LIVENESS_PORT"]["value"] == str(port["containerPort"])
    assert probe["initialDelaySeconds"] > 0 and probe["failureThreshold"] >= 3


def test_metrics_port_is_named_and_matches_the_agents(container: Doc) -> None:
    ports = {p["name"]: p for p in container["ports"]}
    assert set(ports) == {"healthz", "metrics"}
    assert ports["metrics"] == {"name": "metrics", "containerPort": 8081, "protocol": "TCP"}
    assert _env(container)["BLOCKPULL_METRICS_PORT"]["value"] == str(ports["metrics"]["containerPort"])


def test_resources(container: Doc) -> None:
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"memory"}, "memory-limited; no CPU limit (throttling)"


def test_namespace_admits_the_hostpath_volume(rendered: list[Doc]) -> None:
    labels = one(rendered, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


# --- the image agrees with the DaemonSet -----------------------------------------------------


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_is_multi_stage_from_one_pinned_base() -> None:
    text = _dockerfile()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base)
    assert re.findall(r"^FROM (\S+) AS (\w+)$", text, re.MULTILINE) == [
        ("${PYTHON_IMAGE}", "builder"),
        ("${PYTHON_IMAGE}", "runtime"),
    ]
    assert "COPY --from=builder /opt/venv /opt/venv" in text


def test_dockerfile_runs_the_agent_as_the_daemonsets_user(pod: Doc) -> None:
    text = _dockerfile()
    user = pod["securityContext"]
    assert re.findall(r"^USER (\S+)$", text, re.MULTILINE) == [f"{user['runAsUser']}:{user['runAsGroup']}"]
    assert re.findall(r"^ENTRYPOINT (.+)$", text, re.MULTILINE) == ['["blockpull-agent"]']
    assert "PYTHONDONTWRITEBYTECODE=1" in text


def test_dockerfile_installs_no_extras() -> None:
    text = _dockerfile()
    assert "[dev]" not in text and ".whl[" not in text
    assert "pip wheel --no-deps" in text


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    files = {path.as_posix() for path in build_context_files()}
    assert "pyproject.toml" in files
    assert any(name.startswith("operator/blockpull/") for name in files)
    assert not any(name.startswith(("tests/", "deploy/", ".git/")) for name in files)
    assert not any("__pycache__" in name or ".egg-info" in name for name in files)
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", _dockerfile(), re.MULTILINE):
        for item in source.split():
            wanted = item.rstrip("/")
            assert any(name == wanted or name.startswith(f"{wanted}/") for name in files), (
                f"the Dockerfile copies {item}, which is missing or excluded by .dockerignore"
            )
