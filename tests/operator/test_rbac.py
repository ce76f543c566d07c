"""The agent's ClusterRole (deploy/rbac.yaml) grants exactly what the agent uses: every request
it makes in a full workload is allowed, and every verb granted is used.

The stand-in records each request with the client's identity; a real cluster enforces RBAC
itself, so there this test is skipped (the other operator tests prove the role sufficient when
the agent runs in the cluster under its ServiceAccount).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from harness import REPO, AgentFactory, Namespace, VMFactory

from qemulab import Chain
from testapiserver import Permission


def cluster_role() -> dict[str, object]:
    docs = list(yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()))
    roles = [d for d in docs if d and d.get("kind") == "ClusterRole"]
    assert len(roles) == 1
    return dict(roles[0])


def granted(role: dict[str, object]) -> set[Permission]:
    out: set[Permission] = set()
    for rule in role["rules"]:  # type: ignore[attr-defined]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add(Permission(group, resource, verb))
    return out


def test_the_agents_cluster_role_covers_exactly_its_requests(
    ns: Namespace, agent_factory: AgentFactory, chain_factory: object, slow_chain: Chain, vm_in: VMFactory
) -> None:
    stand_in = ns.cluster.stand_in
    if stand_in is None:
        pytest.skip("a real cluster enforces RBAC itself; request recording needs the stand-in")
    # Cluster-wide, as the DaemonSet runs it (no BLOCKPULL_WATCH_NAMESPACE).
    agent = agent_factory("rbac-node", namespace=None)
    quick: Chain = chain_factory(layers=2, size=8 << 20)  # type: ignore[operator]
    vm_in("quick", [quick])
    vm_in("slow", [slow_chain])
    # A pull that completes, then is deleted by its TTL (patch status, events, delete).
    ns.create("done", nodeName="rbac-node", vm="quick", disk=str(quick.top), ttlSecondsAfterFinished=0)
    # A pull deleted while it runs (finalizer added and removed: patch on the object).
    ns.create("aborted", nodeName="rbac-node", vm="slow", disk=str(slow_chain.top), bandwidth="1Mi")
    ns.wait_phase("aborted", "Running")
    ns.delete("aborted")
    ns.wait_gone("aborted", timeout=20)
    ns.wait_gone("done", timeout=20)
    agent.stop()

    role = cluster_role()
    used = stand_in.used_permissions(agent.user)
    assert not stand_in.missing_permissions(role["rules"], user=agent.user)  # type: ignore[arg-type]
    unused = granted(role) - used
    assert not unused, f"granted but never used: {sorted(map(str, unused))}"
    assert used == granted(role), sorted(map(str, used ^ granted(role)))


def test_rbac_file_is_the_one_kustomize_installs() -> None:
    kustomization = yaml.safe_load((REPO / "deploy" / "kustomization.yaml").read_text())
    assert "rbac.yaml" in kustomization["resources"]
    assert Path(REPO / "deploy" / "rbac.yaml").exists()
