"""qemu.qmp pretty-prints every QMP message for its debug log even when that log is off; with
a hundred jobs that was a third of the agent's CPU. Our client formats a message only when the
debug log is on."""

from __future__ import annotations

import logging

import pytest
from qemu.qmp.message import Message

from blockpull.qmp import _RoutingClient


class CountingMessage(Message):
    formatted = 0

    def __str__(self) -> str:
        CountingMessage.formatted += 1
        return super().__str__()


@pytest.fixture
def client() -> _RoutingClient:
    return _RoutingClient("test", lambda _msg: None)


def test_messages_are_not_formatted_while_the_debug_log_is_off(client: _RoutingClient) -> None:
    client.logger.setLevel(logging.INFO)
    CountingMessage.formatted = 0
    reply = CountingMessage({"return": [{"node-name": "n" * 100}] * 50})
    assert client._cb_inbound(reply) is reply
    assert client._cb_outbound(CountingMessage({"execute": "query-jobs"})) is not None
    assert CountingMessage.formatted == 0


def test_messages_are_logged_when_the_debug_log_is_on(
    client: _RoutingClient, caplog: pytest.LogCaptureFixture
) -> None:
    client.logger.setLevel(logging.DEBUG)
    with caplog.at_level(logging.DEBUG, logger=client.logger.name):
        client._cb_outbound(Message({"execute": "query-jobs"}))
        client._cb_inbound(Message({"return": []}))
    text = caplog.text
    assert '--> {\n  "execute": "query-jobs"\n}' in text
    assert '<-- {\n  "return": []\n}' in text
