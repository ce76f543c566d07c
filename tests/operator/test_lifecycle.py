"""The lifecycle of a BlockPull through a real agent process, a real QEMU and real chains."""

from __future__ import annotations

import re

from harness import AgentProcess, Namespace

from qemulab import Chain, check, compare

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_full_pull_completes_with_every_status_field(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in
) -> None:
    vm = vm_in("web-1", [chain4])
    created = ns.create("flatten", nodeName="node-a", vm="web-1", disk=vm.disks[0].top)
    status = ns.wait_phase("flatten", "Completed", "Failed")

    assert status["phase"] == "Completed", status
    assert status["reason"] == "Completed"
    assert status["nodeName"] == "node-a"
    assert status["observedGeneration"] == created["metadata"]["generation"]
    assert status["jobId"] == f"blockpull-{created['metadata']['uid']}"
    assert status["target"]["node"] == vm.disks[0].top
    assert status["progress"] == "100.00%"
    assert status["offset"] == status["length"] == chain4.size
    assert RFC3339.match(status["startTime"]) and RFC3339.match(status["completionTime"])
    assert status["startTime"] <= status["completionTime"]
    assert status["releasedImages"] == [str(p) for p in reversed(chain4.images[:-1])]
    assert ns.conditions("flatten") == {"Running": "False", "Completed": "True", "Failed": "False"}
    assert ns.event_reasons("flatten") == ["Started", "Completed"]
    # The job is dismissed once the outcome is written.
    assert vm.execute_sync("query-block-jobs") == []
    vm.stop_sync()
    assert compare(chain4.top, chain4.reference)
    assert check(chain4.top).clean
