"""One QMP connection to one QEMU, with a timeout on everything and bounded event fan-out.

Owns: connecting to a QMP unix socket, executing commands with a deadline, translating
qemu.qmp's exceptions into BlockPull's error tree, noticing when QEMU goes away, and handing
QEMU's events to whoever subscribed, without ever keeping events nobody asked for.

qemu.qmp keeps every event forever in its default listener (`QMPClient.events`, queue and
history) and that listener cannot be removed, so a long-lived agent connection would grow without
bound. We subclass the client and route events straight into our own subscriptions instead.
It also pretty-prints every message it sends and receives for its debug log whether or not
that log is enabled, which cost the agent about a third of its CPU with a hundred jobs; the
subclass formats them only when the debug log is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, StateError
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate

from blockpull.errors import (
    CommandFailed,
    Disconnected,
    QEMUUnavailable,
    QMPTimeout,
    VMNotFound,
)

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_COMMAND_TIMEOUT = 10.0
#: Events a subscriber may leave unread before it is marked overflowed (and must resync).
DEFAULT_SUBSCRIPTION_DEPTH = 1024


@dataclass(frozen=True)
class Event:
    """One QMP event as QEMU sent it, plus when we received it (monotonic seconds)."""

    name: str
    data: Mapping[str, Any]
    received: float


class Subscription:
    """A bounded queue of events for one consumer.

    When the consumer falls more than `depth` events behind, older events are dropped and
    `overflowed` is set: the consumer must then re-read QEMU's state (`query-jobs`) instead of
    trusting the event stream. That keeps memory bounded without ever silently lying.
    """

    def __init__(self, names: frozenset[str] | None, depth: int) -> None:
        self._names = names
        self._events: deque[Event] = deque(maxlen=depth)
        self._wakeup = asyncio.Event()
        self.overflowed = False
        self.closed_reason: BaseException | None = None

    def wants(self, name: str) -> bool:
        return self._names is None or name in self._names

    def _push(self, event: Event) -> None:
        if len(self._events) == self._events.maxlen:
            self.overflowed = True
        self._events.append(event)
        self._wakeup.set()

    def _close(self, reason: BaseException) -> None:
        self.closed_reason = reason
        self._wakeup.set()

    def pending(self) -> int:
        return len(self._events)

    def drain(self) -> list[Event]:
        """Take every queued event without waiting."""
        events = list(self._events)
        self._events.clear()
        self._wakeup.clear()
        return events

    async def get(self, timeout: float | None = None) -> Event:
        """The next event; raises `Disconnected` once the connection is gone and drained.

        With a `timeout`, raises `TimeoutError` when nothing arrives in time.
        """
        while not self._events:
            if self.closed_reason is not None:
                raise Disconnected(str(self.closed_reason)) from self.closed_reason
            self._wakeup.clear()
            if timeout is None:
                await self._wakeup.wait()
            else:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
                # that arrives as the wait completes (a runner cancelled at shutdown ran on).
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
        return self._events.popleft()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            try:
                yield await self.get()
            except Disconnected:
                return


class _RoutingClient(QMPClient):
    """qemu.qmp client whose events go to our router instead of the ever-growing default."""

    def __init__(self, name: str, route: Callable[[Message], None]) -> None:
        super().__init__(name)
        self._route = route

    async def _event_dispatch(self, msg: Message) -> None:
        self._route(msg)

    # qemu.qmp's message hooks (documented as overridable), without the eager `str(msg)`: a
    # block-graph reply is kilobytes of JSON to indent, on the event loop, for a disabled log.
    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg


@dataclass
class QMPConnection:
    """A live QMP session with a deadline on every call.

    Create with `await QMPConnection.open(path)`. Safe to share between tasks: QMP replies are
    matched by id, so concurrent `execute` calls are fine.
    """

    socket_path: str
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    client_name: str = "blockpull"
    _client: _RoutingClient | None = field(default=None, init=False, repr=False)
    _subscriptions: list[Subscription] = field(default_factory=list, init=False, repr=False)
    _closed: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _close_reason: BaseException | None = field(default=None, init=False, repr=False)
    _watchdog: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    #: Serialises whatever must not interleave with a job reaching `concluded` in QEMU (see
    #: `blockpull.chain`): inspection of block nodes, starting and dismissing jobs.
    graph_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    #: Block node details (node-name -> query-named-block-nodes entry) from the last read that
    #: was safe; a node-name names the same node for its whole life. Owned by `blockpull.chain`.
    node_cache: dict[str, Mapping[str, Any]] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    async def open(
        cls,
        socket_path: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        client_name: str = "blockpull",
    ) -> QMPConnection:
        conn = cls(socket_path, command_timeout=command_timeout, client_name=client_name)
        await conn._connect(connect_timeout)
        return conn

    async def _connect(self, timeout: float) -> None:
        check_socket(self.socket_path)
        client = _RoutingClient(self.client_name, self._route)
        try:
            async with asyncio.timeout(timeout):
                await client.connect(self.socket_path)
        except TimeoutError as exc:
            await _quietly_disconnect(client)
            # A -qmp monitor serves one client at a time: a second client is accepted by the
            # kernel but never greeted. That is the usual cause of this timeout.
            raise QMPTimeout(
                f"QEMU did not greet on {self.socket_path} within {timeout:g}s "
                "(is another client holding this monitor?)"
            ) from exc
        except (ConnectError, OSError, EOFError) as exc:
            await _quietly_disconnect(client)
            raise QEMUUnavailable(
                f"cannot connect to QMP socket {self.socket_path}: {_connect_failure(exc)}"
            ) from exc
        self._client = client
        self._watchdog = asyncio.create_task(self._watch_runstate(client))

    # --- commands -----------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command; every failure becomes a `BlockPullError`."""
        client = self._client
        if client is None or self._closed.is_set():
            raise Disconnected(f"QMP connection to {self.socket_path} is closed") from (self._close_reason)
        deadline = self.command_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(deadline):
                return await client.execute(command, arguments)
        except ExecuteError as exc:
            raise CommandFailed(exc.error.error.desc, exc.error_class) from exc
        except TimeoutError as exc:
            raise QMPTimeout(f"QEMU did not answer {command!r} within {deadline:g}s") from exc
        except (ExecInterruptedError, StateError, EOFError, OSError) as exc:
            raise Disconnected(f"QMP connection to {self.socket_path} lost during {command!r}") from exc

    # --- events ---------------------------------------------------------------------------

    def subscribe(
        self, names: Iterable[str] | None = None, *, depth: int = DEFAULT_SUBSCRIPTION_DEPTH
    ) -> Subscription:
        """Start receiving events (all, or only `names`). Call `unsubscribe` when done."""
        sub = Subscription(frozenset(names) if names is not None else None, depth)
        if self._closed.is_set():
            sub._close(self._close_reason or Disconnected("closed"))
        else:
            self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)

    @contextlib.contextmanager
    def listening(self, names: Iterable[str] | None = None) -> Any:
        sub = self.subscribe(names)
        try:
            yield sub
        finally:
            self.unsubscribe(sub)

    def _route(self, msg: Message) -> None:
        name = str(msg.get("event", ""))
        data = msg.get("data", {})
        event = Event(name, data if isinstance(data, dict) else {}, asyncio.get_running_loop().time())
        for sub in self._subscriptions:
            if sub.wants(name):
                sub._push(event)

    # --- lifetime --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _watch_runstate(self, client: QMPClient) -> None:
        # qemu.qmp notices EOF on its own reader task and moves to DISCONNECTING; nothing tells
        # callers unless they execute something. Watching the runstate lets waiters on events
        # learn at once that QEMU died (SIGKILL, crash, quit).
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        self._mark_closed(Disconnected(f"QEMU closed the QMP connection {self.socket_path}"))
        await _quietly_disconnect(client)

    def _mark_closed(self, reason: BaseException) -> None:
        if self._closed.is_set():
            return
        self._close_reason = reason
        self._closed.set()
        for sub in self._subscriptions:
            sub._close(reason)
        self._subscriptions.clear()

    async def close(self) -> None:
        client = self._client
        self._mark_closed(Disconnected("connection closed by BlockPull"))
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watchdog
        if client is not None:
            await _quietly_disconnect(client)

    async def __aenter__(self) -> QMPConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def check_socket(path: str) -> None:
    """Fail fast, with a reason a user understands, before trying to connect."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise VMNotFound(f"no QMP socket at {path} (is the VM running?)") from exc
    except OSError as exc:
        raise QEMUUnavailable(f"cannot access QMP socket {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise QEMUUnavailable(f"{path} exists but is not a unix socket")


async def _quietly_disconnect(client: QMPClient) -> None:
    # disconnect() re-raises whatever killed the reader (EOFError after QEMU died); closing a
    # dead connection is not an error for us.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            await client.disconnect()


def _connect_failure(exc: BaseException) -> str:
    """What went wrong while connecting, in words (qemu.qmp wraps the cause in ConnectError)."""
    cause = exc.exc if isinstance(exc, ConnectError) else exc
    if isinstance(cause, EOFError) or (isinstance(cause, OSError) and cause.errno == errno.EINVAL):
        # Measured: a -qmp monitor serving another client accepts, then drops or confuses the
        # queued ones (EOF, or "Invalid argument" from the half-closed socket).
        return (
            "the monitor closed the connection before greeting (it is busy with another client, "
            "or this is not a QMP socket)"
        )
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__
