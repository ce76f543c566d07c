"""Spec parsing and bandwidth quantities: what the schema should refuse, refused again here."""

from __future__ import annotations

from typing import Any

import pytest

from blockpull.agent.spec import PullSpec
from blockpull.errors import InvalidSpec
from blockpull.quantity import format_bytes, parse_bandwidth

GOOD: dict[str, Any] = {"nodeName": "worker-3", "vm": "web-1", "disk": "root"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 0),
        (0, 0),
        (1048576, 1048576),
        ("200Mi", 200 * 2**20),
        ("1.5G", 1_500_000_000),
        ("10k", 10_000),
        ("1Gi", 2**30),
        (" 5Mi ", 5 * 2**20),
        ("0", 0),
    ],
)
def test_bandwidth_quantities(value: object, expected: int) -> None:
    assert parse_bandwidth(value) == expected


@pytest.mark.parametrize("value", ["fast", "-1", -1, "10 Mi", "1e9", "Mi", "1.5.5G", True, 1.5, [], "9" * 30])
def test_bad_bandwidth_is_refused(value: object) -> None:
    with pytest.raises(InvalidSpec, match="bandwidth"):
        parse_bandwidth(value)


def test_full_spec() -> None:
    spec = PullSpec.from_spec(
        GOOD
        | {
            "base": "/images/tmpl.qcow2",
            "bandwidth": "200Mi",
            "paused": True,
            "onError": "stop",
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": 0,
        }
    )
    assert spec.bandwidth == 200 * 2**20
    assert spec.paused is True
    assert spec.on_error == "stop"
    assert spec.active_deadline_seconds == 3600
    assert spec.ttl_seconds_after_finished == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vm": "Web_1"}, "DNS-1123"),
        ({"vm": None}, "spec.vm is required"),
        ({"disk": ""}, "spec.disk is required"),
        ({"base": ""}, "spec.base"),
        ({"base": "/images/../etc/x.qcow2"}, "normalized"),
        ({"onError": "retry"}, "onError"),
        ({"paused": "yes"}, "paused"),
        ({"bandwidth": "lots"}, "bandwidth"),
        ({"activeDeadlineSeconds": 0}, "activeDeadlineSeconds"),
        ({"ttlSecondsAfterFinished": -1}, "ttlSecondsAfterFinished"),
        ({"nodeName": None}, "nodeName"),
    ],
)
def test_bad_specs(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        PullSpec.from_spec({k: v for k, v in (GOOD | change).items() if v is not None})


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(2 * 2**30) == "2.0 GiB"
    assert format_bytes(1536) == "1.5 KiB"


def test_fractional_bandwidth_rounds_up_never_to_unlimited() -> None:
    assert parse_bandwidth("0.5") == 1
    assert parse_bandwidth("1.5") == 2
    assert parse_bandwidth("0.5Ki") == 512
    assert parse_bandwidth("0") == 0
