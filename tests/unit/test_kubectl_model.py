"""What the plugin reads from a BlockPull: outcome, progress, the followed set (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from blockpull.cli_render import bar_text
from blockpull.kubectl.model import Followed, Outcome, Pull, outcome_of
from blockpull.quantity import progress_text as percent_text


def obj(name: str, *, uid: str = "u1", ns: str = "vms", **status: Any) -> dict[str, Any]:
    conditions = status.pop("conditions", None)
    body: dict[str, Any] = {
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "1"},
        "spec": {"nodeName": "n1"},
    }
    if status or conditions is not None:
        body["status"] = {**status, "conditions": conditions or []}
    return body


def cond(type_: str, status: str) -> dict[str, str]:
    return {"type": type_, "status": status}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, None),
        ({"phase": "Running", "conditions": [cond("Running", "True"), cond("Completed", "False")]}, None),
        (
            {"phase": "Completed", "conditions": [cond("Completed", "True"), cond("Failed", "False")]},
            "Completed",
        ),
        ({"phase": "Failed", "conditions": [cond("Completed", "False"), cond("Failed", "True")]}, "Failed"),
        # The conditions rule: they never change once True, whatever a stale phase says.
        ({"phase": "Running", "conditions": [cond("Failed", "True")]}, "Failed"),
        # A status without conditions (another writer, an old agent): the phase decides.
        ({"phase": "Completed"}, "Completed"),
        ({"phase": "Failed"}, "Failed"),
    ],
)
def test_outcome_of(status: dict[str, Any], expected: str | None) -> None:
    result = outcome_of(status)
    assert (result.value if result else None) == expected


def test_progress_is_the_agents_text_else_the_same_truncating_rule() -> None:
    assert Pull.of(obj("a", phase="Running", progress="45.12%", offset=1, length=2)).progress == "45.12%"
    assert Pull.of(obj("a", phase="Running", offset=99999, length=100000)).progress == "99.99%"
    assert Pull.of(obj("a")).progress == ""
    assert percent_text(2**31 - 1, 2**31) == "99.99%"  # never rounded up to 100.00%
    assert percent_text(5, 5) == "100.00%"
    assert percent_text(0, 0) == "100.00%"
    assert percent_text(1, 3) == "33.33%"


def test_bar_is_exactly_as_wide_as_asked_and_full_only_when_done() -> None:
    for width in range(2, 40):
        for fraction in (0.0, 0.5, 0.999, 1.0):
            assert len(bar_text(fraction, width)) == width
    assert bar_text(0.999, 12) == "[#########.]"
    assert bar_text(1.0, 12) == "[##########]"
    assert bar_text(0.0, 12) == "[..........]"


def test_named_objects_missing_from_the_listing_are_reported() -> None:
    followed = Followed(["a", "b", "c"])
    followed.snapshot([obj("a"), obj("other")], now=0.0)
    assert followed.missing() == ["b", "c"]
    assert [t.pull.name for t in followed.ordered()] == ["a"]  # "other" is not followed


def test_wait_rule_one_failure_ends_it_all_completed_is_success() -> None:
    followed = Followed(["a", "b"])
    followed.snapshot([obj("a", phase="Running"), obj("b", uid="u2", phase="Running")], now=0.0)
    assert not followed.all_finished() and followed.first_failure() is None
    followed.event("MODIFIED", obj("b", uid="u2", phase="Failed", conditions=[cond("Failed", "True")]), 1.0)
    failed = followed.first_failure()
    assert failed is not None and failed.pull.name == "b"
    assert not followed.all_finished()
    followed.event("MODIFIED", obj("a", phase="Completed", conditions=[cond("Completed", "True")]), 2.0)
    assert followed.all_finished()


def test_deleted_before_an_outcome_is_not_a_completion() -> None:
    followed = Followed()
    followed.snapshot([obj("a", phase="Running", offset=10, length=100)], now=0.0)
    followed.event("DELETED", obj("a", phase="Running", offset=10, length=100), 1.0)
    tracked = followed.objects[("vms", "a")]
    assert tracked.outcome is Outcome.DELETED
    assert followed.first_failure() is tracked and followed.all_finished()


def test_deleted_after_completion_keeps_its_outcome() -> None:
    followed = Followed()
    done = obj("a", phase="Completed", conditions=[cond("Completed", "True")])
    followed.snapshot([done], now=0.0)
    followed.event("DELETED", done, 1.0)  # ttlSecondsAfterFinished
    assert followed.objects[("vms", "a")].outcome is Outcome.COMPLETED


def test_a_relisting_marks_what_vanished_meanwhile_as_gone() -> None:
    followed = Followed()
    followed.snapshot([obj("a", phase="Running"), obj("b", uid="u2", phase="Running")], now=0.0)
    changed = followed.snapshot([obj("a", phase="Running")], now=5.0)  # after 410 Gone
    assert changed == {("vms", "b")}
    assert followed.objects[("vms", "b")].outcome is Outcome.DELETED


def test_the_deleted_event_of_an_older_object_of_that_name_is_ignored() -> None:
    followed = Followed(["a"])
    followed.snapshot([obj("a", uid="new", phase="Pending")], now=0.0)
    assert followed.event("DELETED", obj("a", uid="old", phase="Running"), 1.0) is None
    assert followed.objects[("vms", "a")].outcome is None


def test_rate_and_eta_follow_the_offset_while_running_only() -> None:
    followed = Followed()
    followed.snapshot([obj("a", phase="Running", offset=0, length=100 * 2**20)], now=0.0)
    for second in range(1, 5):
        followed.event(
            "MODIFIED", obj("a", phase="Running", offset=second * 2**20, length=100 * 2**20), second
        )
    tracked = followed.objects[("vms", "a")]
    assert tracked.rate() == pytest.approx(2**20)
    assert tracked.eta() == pytest.approx(96.0)
    followed.event("MODIFIED", obj("a", phase="Paused", offset=4 * 2**20, length=100 * 2**20), 5.0)
    assert tracked.rate() is None and tracked.eta() is None


def test_only_visible_changes_count_as_changes() -> None:
    followed = Followed()
    followed.snapshot([obj("a", phase="Running", progress="1.00%")], now=0.0)
    same = obj("a", phase="Running", progress="1.00%")
    same["metadata"]["resourceVersion"] = "2"
    assert followed.event("MODIFIED", same, 1.0) is None
    assert followed.event("MODIFIED", obj("a", phase="Running", progress="2.00%"), 2.0) == ("vms", "a")
