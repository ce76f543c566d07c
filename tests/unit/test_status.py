"""The status computed from the agent's view: conditions, progress text, terminal rules."""

from __future__ import annotations

from blockpull.agent import status as st


def _build(
    previous: dict[str, object] | None, view: st.StatusView, now: str = "2026-11-25T10:00:00Z"
) -> dict:  # type: ignore[type-arg]
    return st.build_status(previous, view, generation=2, now=now, node_name="worker-3")


def test_progress_text_truncates_and_has_two_decimals() -> None:
    assert st.progress_text(968884224, 2147483648) == "45.11%"
    assert st.progress_text(0, 100) == "0.00%"
    assert st.progress_text(99999, 100000) == "99.99%"
    assert st.progress_text(100, 100) == "100.00%"
    assert st.progress_text(0, 0) == "100.00%"


def test_pending_then_running_then_completed() -> None:
    pending = _build(None, st.StatusView(phase=st.PENDING, reason="WaitingForVM", message="no socket"))
    assert pending["phase"] == "Pending"
    assert pending["observedGeneration"] == 2
    assert pending["nodeName"] == "worker-3"
    assert pending["conditions"] == [
        {
            "type": "Running",
            "status": "False",
            "reason": "WaitingForVM",
            "message": "no socket",
            "lastTransitionTime": "2026-11-25T10:00:00Z",
            "observedGeneration": 2,
        },
        {
            "type": "Completed",
            "status": "False",
            "reason": "Pending",
            "message": "phase is Pending",
            "lastTransitionTime": "2026-11-25T10:00:00Z",
            "observedGeneration": 2,
        },
        {
            "type": "Failed",
            "status": "False",
            "reason": "Pending",
            "message": "phase is Pending",
            "lastTransitionTime": "2026-11-25T10:00:00Z",
            "observedGeneration": 2,
        },
        # The kstatus condition types (contract: "Status that GitOps tools read correctly").
        {
            "type": "Reconciling",
            "status": "True",
            "reason": "WaitingForVM",
            "message": "no socket",
            "lastTransitionTime": "2026-11-25T10:00:00Z",
            "observedGeneration": 2,
        },
        {
            "type": "Stalled",
            "status": "False",
            "reason": "Pending",
            "message": "phase is Pending",
            "lastTransitionTime": "2026-11-25T10:00:00Z",
            "observedGeneration": 2,
        },
        {
            "type": "Ready",
            "status": "False",
            "reason": "Pending",
            "message": "phase is Pending",
            "lastTransitionTime": "2026-11-25T10:00:00Z",
            "observedGeneration": 2,
        },
    ]
    running = _build(
        pending,
        st.StatusView(
            phase=st.RUNNING,
            reason="Streaming",
            message="m",
            job_id="blockpull-x",
            target={"node": "disk-fmt", "base": None},
            offset=50,
            length=200,
            bandwidth=0,
            start_time="2026-11-25T10:00:01Z",
        ),
        now="2026-11-25T10:00:01Z",
    )
    assert running["progress"] == "25.00%"
    assert running["target"] == {"node": "disk-fmt"}
    assert running["conditions"][0]["status"] == "True"
    assert running["conditions"][0]["lastTransitionTime"] == "2026-11-25T10:00:01Z"
    later = _build(
        running,
        st.StatusView(phase=st.RUNNING, reason="Streaming", message="m", offset=100, length=200),
        now="2026-11-25T10:00:05Z",
    )
    # The condition did not change status: its lastTransitionTime stays.
    assert later["conditions"][0]["lastTransitionTime"] == "2026-11-25T10:00:01Z"
    assert later["jobId"] == "blockpull-x"
    assert later["startTime"] == "2026-11-25T10:00:01Z"
    done = _build(
        later,
        st.StatusView(
            phase=st.COMPLETED,
            reason="Completed",
            message="streamed",
            offset=200,
            length=200,
            completion_time="2026-11-25T10:00:09Z",
            released_images=["/images/b.qcow2"],
        ),
        now="2026-11-25T10:00:09Z",
    )
    assert st.is_terminal(done)
    types = {c["type"]: c for c in done["conditions"]}
    assert types["Running"]["status"] == "False"
    assert types["Completed"]["status"] == "True"
    assert types["Failed"]["status"] == "False"
    assert done["releasedImages"] == ["/images/b.qcow2"]
    assert done["progress"] == "100.00%"


def test_failed_is_terminal_with_reason() -> None:
    failed = _build(None, st.StatusView(phase=st.FAILED, reason="IOError", message="Input/output error"))
    assert st.is_terminal(failed)
    types = {c["type"]: c for c in failed["conditions"]}
    assert types["Failed"]["reason"] == "IOError"
    assert types["Failed"]["message"] == "Input/output error"
    assert not st.is_terminal({"conditions": [{"type": "Running", "status": "True"}]})
    assert not st.is_terminal(None)
