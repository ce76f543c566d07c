"""How GitOps tools read live BlockPulls written by a real agent (real QEMU, real chains).

Every version of each object is recorded by a watch from before its creation, and read the way
Flux and kpt read it (kstatus's `Compute`, ported in `kstatus.py`) and the way Argo CD reads it
(`deploy/argocd/health.lua` in a Lua 5.1 stripped like Argo CD's runtime, `argocd_lua.py`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kstatus
import kubernetes
import pytest
from argocd_lua import health
from harness import GROUP, PLURAL, VERSION, AgentProcess, JobEvents, Namespace, VMFactory, eventually

from qemulab import Chain, Disk, InjectError, QemuVM

#: Set to a directory to keep the recorded objects (deploy/argocd/testdata was made this way).
RECORD_DIR = os.environ.get("BLOCKPULL_RECORD_OBJECTS")


class Recorder:
    """Every version of the namespace's BlockPulls, in the order the API server sent them."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.versions: list[dict[str, Any]] = []
        self._watch = kubernetes.watch.Watch()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="recorder")
        self._thread.start()
        assert self._ready.wait(10), "watch did not start"

    def _run(self) -> None:
        listed = self.ns.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns.name, PLURAL)
        self._ready.set()
        stream = self._watch.stream(
            self.ns.custom.list_namespaced_custom_object,
            GROUP, VERSION, self.ns.name, PLURAL,
            resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=300,
        )  # fmt: skip
        try:
            for event in stream:
                if event["type"] in ("ADDED", "MODIFIED"):
                    with self._lock:
                        self.versions.append(dict(event["object"]))
        except Exception:  # the namespace (and with it the watch) went at teardown
            if not self._stopped:
                raise

    _stopped = False

    def of(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [v for v in self.versions if v["metadata"]["name"] == name]

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


@pytest.fixture
def recorder(ns: Namespace) -> Iterator[Recorder]:
    recording = Recorder(ns)
    yield recording
    recording.stop()


def _phase(obj: dict[str, Any]) -> tuple[str, str] | None:
    status = obj.get("status") or {}
    return (status["phase"], status["reason"]) if "phase" in status else None


def _keep(name: str, objects: list[dict[str, Any]]) -> None:
    if not RECORD_DIR:
        return
    path = Path(RECORD_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(objects, indent=1))


def _readings(objects: list[dict[str, Any]]) -> list[tuple[Any, str, str]]:
    """(phase/reason, kstatus, Argo CD health) of each version."""
    return [(_phase(o), kstatus.compute(o).status, health(o)["status"]) for o in objects]


def test_whole_life_reads_in_progress_until_completed(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory, recorder: Recorder
) -> None:
    asked = time.monotonic()
    created = ns.create("life", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="2Mi")
    # The window in which kstatus reads the status-less object as Current: within seconds.
    eventually(lambda: ns.status("life"), timeout=5, interval=0.01, what="a first status")
    window = time.monotonic() - asked
    ns.wait_reason("life", "Pending", "WaitingForVM")
    vm = vm_in("web-1", [slow_chain])
    ns.wait_phase("life", "Running")
    eventually(lambda: ns.status("life").get("offset", 0) > 0, what="progress")
    ns.patch_spec("life", paused=True)
    ns.wait_phase("life", "Paused")
    time.sleep(1)  # a few versions while paused
    ns.patch_spec("life", paused=False)
    eventually(lambda: ns.status("life")["phase"] == "Running", what="resumed")
    ns.patch_spec("life", bandwidth=0)
    assert ns.wait_phase("life", "Completed", "Failed", timeout=60)["phase"] == "Completed"
    eventually(lambda: _phase(recorder.of("life")[-1]) == ("Completed", "Completed"), what="watch caught up")
    vm.stop_sync()

    versions = recorder.of("life")
    _keep("life", versions)
    readings = _readings(versions)
    # The object as created has no status: kstatus reads it Current (its known blind spot,
    # kept as short as the agent can), Argo CD Progressing.
    assert versions[0]["metadata"]["uid"] == created["metadata"]["uid"]
    assert readings[0] == (None, kstatus.CURRENT, "Progressing")
    seen = {phase for phase, _, _ in readings}
    # ("Pending", "Starting") may be missing: when the agent knows the next phase before the
    # first-status write has begun (here: no QMP socket yet), it writes that phase instead.
    assert {
        ("Pending", "WaitingForVM"), ("Running", "Streaming"), ("Paused", "Paused"),
        ("Completed", "Completed"),
    } <= seen, seen  # fmt: skip
    with_status = [r for r in readings if r[0] is not None]
    first_done = next(i for i, r in enumerate(with_status) if r[0][0] == "Completed")
    for phase, computed, argo in with_status[:first_done]:
        # Never Current before Completed once status exists.
        assert computed == kstatus.IN_PROGRESS, (phase, computed)
        assert argo == ("Suspended" if phase == ("Paused", "Paused") else "Progressing"), (phase, argo)
    for phase, computed, argo in with_status[first_done:]:
        assert (phase, computed, argo) == (("Completed", "Completed"), kstatus.CURRENT, "Healthy")
    # kstatus's message is the agent's: the reason shows in `flux`/`kpt` output.
    pending = next(o for o in versions if _phase(o) == ("Pending", "WaitingForVM"))
    assert kstatus.compute(pending).message.startswith("no QMP socket at ")
    running = next(o for o in versions if _phase(o) == ("Running", "Streaming") and "progress" in o["status"])
    assert health(running)["message"].startswith("Streaming: " + running["status"]["progress"])
    # The first status is written at first sight: Pending/Starting, or the phase that
    # superseded it while it waited for its write (never a later one, nor an empty status).
    first = next(o for o in versions if o.get("status"))
    assert _phase(first) in {("Pending", "Starting"), ("Pending", "WaitingForVM")}, _phase(first)
    assert kstatus.compute(first).status == kstatus.IN_PROGRESS
    print(f"create -> first status seen: {window * 1000:.0f} ms")


def test_created_paused_reads_suspended_in_argo_cd(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory, recorder: Recorder
) -> None:
    vm_in("web-1", [chain4])
    ns.create("held", nodeName="node-a", vm="web-1", disk=str(chain4.top), paused=True)
    held = ns.wait_reason("held", "Pending", "Paused")
    obj = ns.get("held")
    assert obj is not None and obj["status"] == held
    _keep("held", [obj])
    assert kstatus.compute(obj).status == kstatus.IN_PROGRESS
    assert health(obj) == {"status": "Suspended", "message": "Paused by spec.paused: " + held["message"]}


def test_failures_read_failed_and_degraded_with_reason(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory, recorder: Recorder
) -> None:
    vm_in("web-1", [chain4])
    ns.create("nodisk", nodeName="node-a", vm="web-1", disk="vdz")
    status = ns.wait_phase("nodisk", "Completed", "Failed")
    assert (status["phase"], status["reason"]) == ("Failed", "DiskNotFound")
    ns.create("late", nodeName="node-a", vm="never", disk="vda", activeDeadlineSeconds=2)
    late = ns.wait_phase("late", "Completed", "Failed", timeout=15)
    assert (late["phase"], late["reason"]) == ("Failed", "DeadlineExceeded")
    for name in ("nodisk", "late"):
        eventually(lambda n=name: _phase(recorder.of(n)[-1])[0] == "Failed", what=f"{name} watched")  # type: ignore[index, misc]
        versions = recorder.of(name)
        _keep(name, versions)
        final = versions[-1]
        result = kstatus.compute(final)
        assert (result.status, result.message) == (kstatus.FAILED, final["status"]["message"])
        assert health(final) == {
            "status": "Degraded",
            "message": f"{final['status']['reason']}: {final['status']['message']}",
        }
        readings = [r for r in _readings(versions) if r[0] is not None]
        failed_at = next(i for i, r in enumerate(readings) if r[0][0] == "Failed")
        assert readings[:failed_at], "seen before it failed"
        for phase, computed, argo in readings[:failed_at]:
            assert (computed, argo) == (kstatus.IN_PROGRESS, "Progressing"), phase
        for phase, computed, argo in readings[failed_at:]:
            assert (phase[0], computed, argo) == ("Failed", kstatus.FAILED, "Degraded")


def _outcome_view(status: dict[str, Any]) -> dict[str, Any]:
    """Everything of a status but the generation it was observed at."""
    view = {k: v for k, v in status.items() if k != "observedGeneration"}
    view["conditions"] = [
        {k: v for k, v in c.items() if k != "observedGeneration"} for c in status["conditions"]
    ]
    return view


@pytest.mark.parametrize("outcome", ["Completed", "Failed"])
def test_spec_edit_of_a_finished_object_is_observed_and_nothing_restarts(  # noqa: PLR0917
    outcome: str,
    ns: Namespace,
    agent: AgentProcess,
    chain4: Chain,
    vm_in: VMFactory,
    job_events: Callable[[QemuVM], JobEvents],
) -> None:
    vm = vm_in("web-1", [chain4], extra_monitors=1)
    events = job_events(vm)
    disk = str(chain4.top) if outcome == "Completed" else "vdz"
    ns.create("done", nodeName="node-a", vm="web-1", disk=disk)
    before = ns.wait_phase("done", "Completed", "Failed")
    assert before["phase"] == outcome
    expected = kstatus.CURRENT if outcome == "Completed" else kstatus.FAILED
    assert kstatus.compute(ns.get("done") or {}).status == expected
    time.sleep(1.5)  # completionTime has one-second resolution: a rewrite would show

    # Re-applied from Git with a new bandwidth and TTL: generation 2.
    edited = ns.patch_spec("done", bandwidth="50Mi", ttlSecondsAfterFinished=3600)
    assert edited["metadata"]["generation"] == 2
    assert kstatus.compute(edited).status == kstatus.IN_PROGRESS  # until the agent observes it
    after = eventually(
        lambda: (s := ns.status("done")).get("observedGeneration") == 2 and s, timeout=10, what="observed"
    )
    assert all(c["observedGeneration"] == 2 for c in after["conditions"])
    obj = ns.get("done")
    assert obj is not None
    assert kstatus.compute(obj).status == expected
    # The outcome, its reason, message and times stay as they were.
    assert _outcome_view(after) == _outcome_view(before)
    time.sleep(1)
    assert ns.status("done") == after, "written once"
    # Nothing restarted: no second job in QEMU, no second Started, the object still there.
    job_ids = {ev.data.get("id") for ev in events.watcher.events("JOB_STATUS_CHANGE")}
    assert len(job_ids) == (1 if outcome == "Completed" else 0)
    ns.assert_event_reasons("done", ["Started", "Completed"] if outcome == "Completed" else ["Failed"])


def test_spec_edits_of_unfinished_objects_are_observed(
    ns: Namespace, agent: AgentProcess, slow_chain: Chain, vm_in: VMFactory
) -> None:
    # Pending (no VM yet): the edit changes nothing to wait for, yet must be observed.
    ns.create("waiting", nodeName="node-a", vm="web-9", disk="vda")
    ns.wait_reason("waiting", "Pending", "WaitingForVM")
    assert ns.patch_spec("waiting", bandwidth="10Mi")["metadata"]["generation"] == 2
    status = eventually(
        lambda: (s := ns.status("waiting")).get("observedGeneration") == 2 and s, timeout=10, what="observed"
    )
    assert (status["phase"], status["reason"]) == ("Pending", "WaitingForVM")
    assert kstatus.compute(ns.get("waiting") or {}).status == kstatus.IN_PROGRESS

    # Running: the same bandwidth written another way is a new generation with an equal spec.
    vm_in("web-1", [slow_chain])
    ns.create("steady", nodeName="node-a", vm="web-1", disk=str(slow_chain.top), bandwidth="1Mi")
    ns.wait_phase("steady", "Running")
    assert ns.patch_spec("steady", bandwidth=1048576)["metadata"]["generation"] == 2
    eventually(lambda: ns.status("steady").get("observedGeneration") == 2, timeout=10, what="observed")
    assert ns.status("steady")["phase"] == "Running"
    ns.assert_event_reasons("steady", ["Started"])


def test_paused_by_qemu_after_an_io_error_reads_degraded_in_argo_cd(
    ns: Namespace, agent: AgentProcess, chain4: Chain, vm_in: VMFactory, recorder: Recorder
) -> None:
    # Not the user's pause: QEMU stopped the job (onError: stop) and only a person can retry it.
    disk = Disk(chain4, inject={0: [InjectError(sector=2048)]})
    vm = vm_in("web-1", [disk])
    ns.create("stopped", nodeName="node-a", vm="web-1", disk=vm.disks[0].top, onError="stop")
    status = ns.wait_reason("stopped", "Paused", "PausedOnErrorFailed")
    obj = ns.get("stopped")
    assert obj is not None and obj["status"] == status
    _keep("stopped", [obj])
    assert kstatus.compute(obj).status == kstatus.IN_PROGRESS  # not finished: it can be retried
    assert health(obj) == {"status": "Degraded", "message": f"PausedOnErrorFailed: {status['message']}"}
