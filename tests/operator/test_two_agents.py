"""Agents of two nodes share one API: each handles its own node's objects only, and never
writes to the other's (counted per agent by the stand-in; on a real cluster, by the Events'
source host and the status' nodeName)."""

from __future__ import annotations

from typing import Any

from harness import AgentFactory, Namespace, VMFactory

from qemulab import Chain, compare


def test_two_agents_each_serve_only_their_own_node(
    ns: Namespace,
    agent_factory: AgentFactory,
    chain_factory: Any,
    vm_in: VMFactory,
) -> None:
    agents = {node: agent_factory(node) for node in ("node-a", "node-b")}
    chains: dict[str, Chain] = {}
    vms = {}
    for node in agents:
        for k in range(2):
            name = f"{node}-vm{k}"
            chains[name] = chain_factory(layers=3, size=16 << 20)
            vms[name] = vm_in(name, [chains[name]])
            ns.create(f"pull-{name}", nodeName=node, vm=name, disk=str(chains[name].top))

    for name in chains:
        status = ns.wait_phase(f"pull-{name}", "Completed", "Failed")
        assert status["phase"] == "Completed", status
        node = name.rsplit("-", 1)[0]
        assert status["nodeName"] == node
        ns.wait_event(f"pull-{name}", "Completed")
        assert {e["host"] for e in ns.events(f"pull-{name}")} == {node}

    stand_in = ns.cluster.stand_in
    if stand_in is not None:
        for node, agent in agents.items():
            mine = {f"pull-{name}" for name in chains if name.startswith(node)}
            writes = agent.writes()
            objects_written = {
                (r.name if r.resource == "blockpulls" else r.body["involvedObject"]["name"]) for r in writes
            }
            assert objects_written == mine, (node, objects_written)
            # Each object: the finalizer (add, remove), kopf's last-handled annotation, the
            # status transitions (Pending is skipped when the VM answers at once), and two Events.
            per_object = {name: sum(1 for r in writes if _about(r) == name) for name in mine}
            assert all(count <= 9 for count in per_object.values()), per_object
            # The API server filtered the watch: no object of the other node was ever sent.
            lists = stand_in.requests_by(user=agent.user, resource="blockpulls", verb=["list", "watch"])
            assert lists and all(r.query.get("fieldSelector") == f"spec.nodeName={node}" for r in lists)

    for name, vm in vms.items():
        vm.stop_sync()
        assert compare(chains[name].top, chains[name].reference)


def _about(request: Any) -> str:
    if request.resource == "blockpulls":
        return str(request.name)
    return str(request.body["involvedObject"]["name"])
