"""The conditions GitOps tools read (Reconciling, Stalled, Ready), for every phase and reason, and
what a finished object's status becomes when a later spec edit is observed."""

from __future__ import annotations

from typing import Any

import pytest

from blockpull.agent import status as st

#: Every (phase, reason) the agent writes (README: Conditions and reasons).
PHASES_AND_REASONS = [
    (st.PENDING, reason)
    for reason in ("Starting", "WaitingForVM", "QEMUUnavailable", "DiskBusy", "Paused", "Queued")
] + [
    (st.RUNNING, "Streaming"),
    (st.PAUSED, "Paused"),
    (st.PAUSED, "PausedOnErrorFailed"),
    (st.PAUSED, "PausedOnErrorNospace"),
    (st.COMPLETED, "Completed"),
] + [
    (st.FAILED, reason)
    for reason in (
        "IOError", "DiskNotFound", "BaseNotInChain", "DeadlineExceeded", "VMExited", "InvalidSpec",
        "Cancelled", "QEMUError",
    )
]  # fmt: skip
NOW = "2026-12-04T10:00:00Z"


def _status(
    phase: str, reason: str, previous: dict[str, Any] | None = None, now: str = NOW
) -> dict[str, Any]:
    view = st.StatusView(phase=phase, reason=reason, message=f"message of {reason}")
    return st.build_status(previous, view, generation=3, now=now, node_name="n")


def _by_type(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


@pytest.mark.parametrize(("phase", "reason"), PHASES_AND_REASONS)
def test_the_contracts_table(phase: str, reason: str) -> None:
    conditions = _by_type(_status(phase, reason))
    assert list(conditions) == ["Running", "Completed", "Failed", "Reconciling", "Stalled", "Ready"]
    truth = {
        kind: c["status"] for kind, c in conditions.items() if kind in ("Reconciling", "Stalled", "Ready")
    }
    if phase in (st.PENDING, st.RUNNING, st.PAUSED):
        assert truth == {"Reconciling": "True", "Stalled": "False", "Ready": "False"}
        assert conditions["Reconciling"]["reason"] == reason
        assert conditions["Reconciling"]["message"] == f"message of {reason}"
    elif phase == st.COMPLETED:
        assert truth == {"Reconciling": "False", "Stalled": "False", "Ready": "True"}
        assert conditions["Ready"]["reason"] == "Completed"
    else:
        assert truth == {"Reconciling": "False", "Stalled": "True", "Ready": "False"}
        assert (conditions["Stalled"]["reason"], conditions["Stalled"]["message"]) == (
            reason,
            f"message of {reason}",
        )
    assert not (conditions["Reconciling"]["status"] == conditions["Stalled"]["status"] == "True")
    for condition in conditions.values():
        assert condition["observedGeneration"] == 3
        if condition["status"] == "False" and condition["type"] != "Running":
            assert (condition["reason"], condition["message"]) == (phase, f"phase is {phase}")


def test_last_transition_time_moves_only_when_the_status_does() -> None:
    pending = _status(st.PENDING, "WaitingForVM", now="2026-12-04T10:00:00Z")
    running = _status(st.RUNNING, "Streaming", pending, now="2026-12-04T10:00:05Z")
    done = _status(st.COMPLETED, "Completed", running, now="2026-12-04T10:01:00Z")
    times = [{k: c["lastTransitionTime"] for k, c in _by_type(s).items()} for s in (pending, running, done)]
    assert times[1]["Reconciling"] == "2026-12-04T10:00:00Z"  # still True
    assert times[1]["Stalled"] == times[2]["Stalled"] == "2026-12-04T10:00:00Z"  # never True
    assert times[2]["Reconciling"] == times[2]["Ready"] == "2026-12-04T10:01:00Z"


@pytest.mark.parametrize(("phase", "reason"), [(st.COMPLETED, "Completed"), (st.FAILED, "IOError")])
def test_a_finished_status_catches_up_with_a_new_generation_and_nothing_else(phase: str, reason: str) -> None:
    finished = _status(phase, reason) | {"completionTime": NOW, "startTime": "2026-12-04T09:59:00Z"}
    assert st.observe_generation(finished, 3) is None  # observed already
    patch = st.observe_generation(finished, 4)
    assert patch is not None
    assert set(patch) == {"observedGeneration", "conditions"} and patch["observedGeneration"] == 4
    assert [c["observedGeneration"] for c in patch["conditions"]] == [4] * 6
    strip = [{k: v for k, v in c.items() if k != "observedGeneration"} for c in patch["conditions"]]
    assert strip == [
        {k: v for k, v in c.items() if k != "observedGeneration"} for c in finished["conditions"]
    ]
    assert st.observe_generation(finished | patch, 4) is None


def test_unfinished_statuses_are_the_runners_to_write() -> None:
    assert st.observe_generation(_status(st.RUNNING, "Streaming"), 9) is None
    assert st.observe_generation({}, 1) is None


def test_a_status_from_before_the_gitops_conditions_gets_them_dated_at_the_outcome() -> None:
    old = {
        "phase": "Failed",
        "reason": "DiskNotFound",
        "message": "no disk vdz",
        "observedGeneration": 1,
        "completionTime": "2026-11-30T08:00:00Z",
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": "m",
             "lastTransitionTime": "2026-11-30T08:00:00Z", "observedGeneration": 1}
            for t, s, r in (("Running", "False", "JobEnded"), ("Completed", "False", "Failed"),
                            ("Failed", "True", "DiskNotFound"))
        ],
    }  # fmt: skip
    patch = st.observe_generation(old, 1)
    assert patch is not None
    added = _by_type(patch)
    assert added["Stalled"] == {
        "type": "Stalled",
        "status": "True",
        "reason": "DiskNotFound",
        "message": "no disk vdz",
        "lastTransitionTime": "2026-11-30T08:00:00Z",
        "observedGeneration": 1,
    }
    assert (added["Reconciling"]["status"], added["Ready"]["status"]) == ("False", "False")
    assert patch["conditions"][:3] == old["conditions"]


def test_kstatus_precedence_cannot_matter() -> None:
    # kstatus takes the first True of Reconciling/Stalled in list order: at most one is True.
    for phase, reason in PHASES_AND_REASONS:
        true = [c["type"] for c in _status(phase, reason)["conditions"] if c["status"] == "True"]
        assert len(set(true) & {"Reconciling", "Stalled", "Ready"}) == 1, (phase, true)
