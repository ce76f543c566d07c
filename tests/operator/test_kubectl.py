"""What a cluster admin types: kubectl apply, get, wait, patch, describe and delete."""

from __future__ import annotations

import time

from harness import AgentProcess, Namespace, VMFactory, assert_intact, assert_no_jobs, eventually

from qemulab import Chain, backing_chain


def test_apply_get_patch_wait_describe(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm_in("web-1", [slow_chain])
    manifest = ns.manifest(
        "flatten-web-1-root", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="1Mi"
    )
    assert "created" in ns.apply(manifest).stdout
    ns.wait_phase("flatten-web-1-root", "Running")
    eventually(lambda: ns.status("flatten-web-1-root").get("offset", 0) > 0, what="progress")

    table = ns.kubectl("get", "bp").stdout.splitlines()
    assert table[0].split() == ["NAME", "NODE", "VM", "DISK", "PHASE", "PROGRESS", "AGE"]
    row = table[1].split()
    assert row[:5] == ["flatten-web-1-root", "node-a", "web-1", str(slow_chain.top), "Running"]
    assert row[5].endswith("%")
    wide = ns.kubectl("get", "blockpull", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "NODE", "VM", "DISK", "PHASE", "PROGRESS", "AGE", "REASON", "BASE"]
    assert wide[1].split()[7] == "Streaming"

    ns.kubectl("patch", "bp", "flatten-web-1-root", "--type=merge", "-p", '{"spec":{"bandwidth":"512Mi"}}')
    waited = ns.kubectl(
        "wait", "--for=condition=Completed", "bp/flatten-web-1-root", "--timeout=60s", timeout=70
    )
    assert waited.stdout.strip() == "blockpull.blockpull.dev/flatten-web-1-root condition met"
    ns.wait_event("flatten-web-1-root", "Completed")

    described = ns.kubectl("describe", "bp", "flatten-web-1-root").stdout
    for line in ("Phase:", "Completed", "Released Images:", "Events:", "Started", "BandwidthChanged"):
        assert line in described, described
    done = ns.kubectl("get", "bp", "flatten-web-1-root", "-o", "jsonpath={.status.phase} {.status.progress}")
    assert done.stdout == "Completed 100.00%"
    assert backing_chain(slow_chain.top, force_share=True) == [str(slow_chain.top)]


def test_kubectl_delete_aborts_and_returns_once_qemu_confirmed(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    vm = vm_in("web-1", [slow_chain])
    ns.apply(
        ns.manifest("abort-me", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="1Mi")
    )
    ns.wait_phase("abort-me", "Running")
    started = time.monotonic()
    deleted = ns.kubectl("delete", "bp", "abort-me", timeout=60)
    assert deleted.stdout.strip() == 'blockpull.blockpull.dev "abort-me" deleted'
    assert time.monotonic() - started < 10
    assert ns.get("abort-me") is None
    assert_no_jobs(vm)
    vm.stop_sync()
    assert_intact(slow_chain)


def test_immutable_fields_are_refused_by_the_api(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory
) -> None:
    ns.create("fixed", nodeName="node-a", vm="nowhere", disk="vda")
    for patch in ('{"spec":{"vm":"other"}}', '{"spec":{"disk":"vdb"}}', '{"spec":{"nodeName":"node-b"}}'):
        result = ns.kubectl("patch", "bp", "fixed", "--type=merge", "-p", patch, check=False)
        assert result.returncode != 0
        assert "immutable" in result.stderr, result.stderr
    assert ns.get("fixed")["spec"]["vm"] == "nowhere"  # type: ignore[index]
