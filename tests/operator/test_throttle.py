"""Status writes are throttled: at most one progress write per object per interval
(BLOCKPULL_STATUS_INTERVAL, 0.5 s in these tests), plus one per transition."""

from __future__ import annotations

import itertools
import math
import time

import pytest
from harness import AgentProcess, Namespace, VMFactory

from qemulab import Chain


def test_progress_writes_are_throttled_per_interval(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    stand_in = ns.cluster.stand_in
    if stand_in is None:
        pytest.skip("counting one agent's writes needs the stand-in's request log")
    vm_in("web-1", [slow_chain])
    ns.create("steady", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="4Mi")
    ns.wait_phase("steady", "Running")
    started = time.monotonic()
    status = ns.wait_phase("steady", "Completed", "Failed", timeout=60)
    ran_for = time.monotonic() - started
    assert status["phase"] == "Completed"
    time.sleep(0.5)

    status_writes = [
        r
        for r in agent.writes()
        if r.resource == "blockpulls" and r.subresource == "status" and r.name == "steady"
    ]
    # Transitions: Pending/Starting (the first status, written on first sight, unless Running
    # superseded it before its write began), Running (started), the initial spec application,
    # Completed.
    starting = [r for r in status_writes if (r.body or {}).get("status", {}).get("reason") == "Starting"]
    transitions = 3 + len(starting)
    budget = transitions + math.ceil(ran_for / 0.5) + 1
    assert len(status_writes) <= budget, (len(status_writes), budget, ran_for)
    # And progress was reported while it ran (a few seconds at 4 MiB/s), not only at the end.
    assert len(status_writes) >= transitions + 2
    gaps = [b.time - a.time for a, b in itertools.pairwise(status_writes)]
    progress_gaps = [g for g in gaps if g < 0.45]
    assert len(progress_gaps) <= transitions, gaps
