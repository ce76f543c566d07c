"""The guard against QEMU 7.2's crash: `query-named-block-nodes` is only sent when no job can
reach `concluded` during the command (see blockpull.chain)."""

from __future__ import annotations

from typing import Any

import pytest

from blockpull.chain import nodes_query_is_safe


def job(status: str, job_id: str = "j") -> dict[str, Any]:
    return {"id": job_id, "type": "stream", "status": status}


def block_job(auto_finalize: bool, job_id: str = "j") -> dict[str, Any]:
    return {"device": job_id, "type": "stream", "auto-finalize": auto_finalize}


@pytest.mark.parametrize(
    ("jobs", "block_jobs", "safe"),
    [
        ([], [], True),
        ([job("paused")], [block_job(True)], True),
        ([job("standby")], [block_job(True)], True),
        ([job("pending")], [block_job(False)], True),  # held for us: only we move it on
        ([job("running")], [block_job(False)], False),
        ([job("waiting")], [block_job(False)], False),  # moves to pending, then maybe on
        ([job("pending")], [block_job(True)], False),  # finalizes by itself any moment
        ([job("pending")], [], False),  # not a block job we can vouch for
        ([job("concluded")], [block_job(False)], False),  # the crash itself
        ([job("aborting")], [block_job(False)], False),
        ([job("paused", "a"), job("running", "b")], [block_job(True, "a"), block_job(True, "b")], False),
        ([job("paused", "a"), job("pending", "b")], [block_job(True, "a"), block_job(False, "b")], True),
    ],
)
def test_named_nodes_are_listed_only_when_no_job_can_conclude(
    jobs: list[dict[str, Any]], block_jobs: list[dict[str, Any]], safe: bool
) -> None:
    assert nodes_query_is_safe(jobs, block_jobs) is safe
