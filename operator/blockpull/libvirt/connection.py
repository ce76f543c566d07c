"""One shared libvirt connection per URI, on asyncio, that survives libvirtd restarts.

Owns: libvirt's event loop integration (`libvirtaio`, registered on the running loop BEFORE
the first connection opens: a connection opened earlier registers event callbacks without
error and never gets an event), opening with keepalive, the close callback and reconnecting
with backoff, the block-job and lifecycle event registrations (re-registered on every new
connection), translating libvirt's errors into BlockPull's, and what the events tell about
each domain's jobs (`DomainJobs`), kept here so that every driver of a domain shares it.

libvirt calls are synchronous and take ~1-3 ms against a local daemon, so they run on the
loop: libvirtaio's callbacks are not thread-safe, and a call moved to a thread would register
handles from that thread. A daemon that stops answering bounds a call through keepalive
(`interval * (count + 1)` seconds), after which the connection is closed and re-opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import libvirtaio

import libvirt
from blockpull.driver import CANCELLED_ERROR, Progress
from blockpull.errors import BlockPullError, CommandFailed, HypervisorUnavailable, VMNotFound
from blockpull.libvirt import watchdog

log = logging.getLogger(__name__)

T = TypeVar("T")

#: libvirt error codes BlockPull tells apart (stable across releases; see virerror.h).
ERR_INVALID_ARG = 8  # bad disk or base, or no job on the disk
ERR_SYSTEM_ERROR = 38  # cannot connect, connection reset
ERR_RPC = 39
ERR_NO_DOMAIN = 42
ERR_OPERATION_INVALID = 55  # domain not running; RELATIVE without a relative chain
ERR_NO_CONNECT = 5
ERR_INVALID_CONN = 19
ERR_AUTH_FAILED = 45
ERR_AGAIN = 84  # "already in active block job" (VIR_ERR_OPERATION_UNSUPPORTED)
_CONNECTION_ERRORS = frozenset({ERR_SYSTEM_ERROR, ERR_RPC, ERR_NO_CONNECT, ERR_INVALID_CONN})

#: libvirt's block-job type numbers, in the vocabulary of `Progress.job_type`.
JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "stream",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "mirror",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "commit",
    getattr(libvirt, "VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP", 5): "backup",
}

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection (exited or restarted)",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "libvirtd stopped answering keepalives",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by this client",
}


class _EventImpl:
    """The loop libvirt's events are bound to (process-wide, like libvirt's own registration)."""

    loop: asyncio.AbstractEventLoop | None = None


def _silence(_opaque: object, _error: object) -> None:
    """libvirt's default error handler prints every error to stderr; ours raise instead."""


def ensure_event_impl() -> None:
    """Bind libvirt's event loop to the running asyncio loop (once per loop, before any open).

    A process drives libvirt from one loop at a time; a new loop (a new `asyncio.run`) may
    take over once every connection of the old one is closed.
    """
    loop = asyncio.get_running_loop()
    bound = _EventImpl.loop
    if bound is loop:
        return
    if bound is not None and bound.is_running() and not bound.is_closed():
        raise RuntimeError("libvirt's events are bound to another running asyncio loop")
    libvirt.registerErrorHandler(_silence, None)
    libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    _EventImpl.loop = loop


def socket_of(uri: str) -> str | None:
    """The UNIX socket a `qemu+unix://...?socket=PATH` URI names (None: libvirt's default)."""
    query = urllib.parse.urlsplit(uri).query
    values = urllib.parse.parse_qs(query).get("socket")
    return values[0] if values else None


@dataclass
class DomainJobs:
    """What this connection knows about one domain's block jobs beyond libvirt's answers.

    libvirt forgets a job the moment it ends; its BLOCK_JOB_2 event is the only record of how
    it ended. `concluded` keeps that as a concluded `Progress` per disk target until someone
    dismisses it. `last` is each target's latest running reading (the event carries no
    offset). `aliases` maps job ids given at start to targets.
    """

    name: str
    concluded: dict[str, Progress] = field(default_factory=dict)
    last: dict[str, Progress] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    gone: bool = False
    waiters: set[asyncio.Event] = field(default_factory=set)

    def wake(self) -> None:
        for event in self.waiters:
            event.set()


#: Text of a failed job's outcome: libvirt passes on no error text for block jobs.
FAILED_WITHOUT_TEXT = (
    "the block job failed; libvirt reports no error text for block jobs: QEMU's message is only in "
    "libvirtd's own log (journalctl -u libvirtd or virtqemud, or its log_outputs file) around this "
    "time; the domain log /var/log/libvirt/qemu/<domain>.log may say more"
)


class LibvirtConnection:
    """A libvirt connection to `uri`, re-opened after libvirtd goes away.

    `await open()` once; then `call(fn, ...)` runs one libvirt call with errors translated,
    `domain(name)` looks a domain up. While libvirtd is unreachable every call raises
    `HypervisorUnavailable` at once and a background task reconnects with backoff; on the new
    connection the event callbacks are registered again and every waiter is woken, so that
    whoever follows a job reads it again (re-attaching to a running one).
    """

    def __init__(
        self,
        uri: str,
        *,
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        reconnect_max_delay: float = 5.0,
        call_timeout: float = 10.0,
    ) -> None:
        self.uri = uri
        #: The longest a libvirt call may block the loop (see `blockpull.libvirt.watchdog`).
        self.call_timeout = call_timeout
        self._sockets: dict[int, str] = {}
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        self.reconnect_max_delay = reconnect_max_delay
        self._conn: libvirt.virConnect | None = None
        self._generation = 0
        self._callback_ids: list[int] = []
        self._closed = False
        self._lost_reason = "not connected yet"
        self._reconnector: asyncio.Task[None] | None = None
        self._domains: dict[str, DomainJobs] = {}
        self._handles: dict[str, libvirt.virDomain] = {}
        #: How many times a connection was opened (1 after `open`; +1 per reconnect).
        self.connects = 0

    # --- state ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Closed for good by `close()` (a lost connection that is being re-opened is not)."""
        return self._closed

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def jobs(self, domain: str) -> DomainJobs:
        return self._domains.setdefault(domain, DomainJobs(domain))

    # --- opening and reconnecting --------------------------------------------------------

    async def open(self) -> LibvirtConnection:
        """Connect now; `HypervisorUnavailable` if libvirtd cannot be reached."""
        ensure_event_impl()
        if self._closed:
            raise HypervisorUnavailable(f"the libvirt connection to {self.uri} is closed")
        if self._conn is None:
            self._connect()
        return self

    def _connect(self) -> None:
        socket = socket_of(self.uri)
        if socket is not None and not os.path.exists(socket):
            raise HypervisorUnavailable(f"libvirtd is not reachable at {self.uri}: no socket {socket}")
        before = watchdog.socket_fds()
        try:
            with watchdog.guard(self.call_timeout, None, before=before, daemon_socket=socket) as fired:
                conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            why = f"no answer within {self.call_timeout:g} s" if fired.is_set() else exc.get_error_message()
            raise HypervisorUnavailable(f"libvirtd is not reachable at {self.uri}: {why}") from exc
        self._sockets = watchdog.new_daemon_sockets(before, socket)
        try:
            conn.setKeepAlive(self.keepalive_interval, self.keepalive_count)
            self._generation += 1
            conn.registerCloseCallback(self._on_close, self._generation)
            self._callback_ids = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, self._generation
                ),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, self._generation
                ),
            ]
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise HypervisorUnavailable(
                f"libvirtd at {self.uri} refused event registration: {exc.get_error_message()}"
            ) from exc
        self._conn = conn
        self._handles.clear()
        self.connects += 1
        if self.connects > 1:
            log.info("libvirt: reconnected to %s", self.uri)
        # Events may have been missed while disconnected: everyone re-reads.
        for jobs in self._domains.values():
            jobs.wake()

    def _on_close(self, _conn: libvirt.virConnect, reason: int, generation: int) -> None:
        # Never touch the connection in here: libvirt holds its lock while calling us.
        if generation != self._generation or self._conn is None:
            return
        dead = self._conn
        self._conn = None
        self._handles.clear()
        self._lost_reason = _CLOSE_REASONS.get(reason, f"closed (reason {reason})")
        log.warning("libvirt: connection to %s lost: %s", self.uri, self._lost_reason)
        for jobs in self._domains.values():
            jobs.wake()
        if not self._closed:
            asyncio.get_running_loop().call_soon(self._after_loss, dead)

    def _after_loss(self, dead: libvirt.virConnect) -> None:
        self._release(dead)
        self._ensure_reconnecting()

    def _release(self, conn: libvirt.virConnect) -> None:
        for callback_id in self._callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        self._callback_ids = []
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _ensure_reconnecting(self) -> None:
        if self._closed or self._conn is not None:
            return
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closed and self._conn is None:
            try:
                self._connect()
                return
            except HypervisorUnavailable as exc:
                self._lost_reason = exc.message
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_delay)

    def _lost(self, exc: libvirt.libvirtError | None = None) -> None:
        """A call found the connection dead before the close callback said so."""
        if self._conn is not None and not self._conn_alive():
            dead = self._conn
            self._conn = None
            self._handles.clear()
            self._lost_reason = exc.get_error_message() if exc is not None else "connection dead"
            for jobs in self._domains.values():
                jobs.wake()
            self._release(dead)
        self._ensure_reconnecting()

    def _conn_alive(self) -> bool:
        try:
            return self._conn is not None and bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    # --- calls ---------------------------------------------------------------------------

    def connection(self) -> libvirt.virConnect:
        """The live connection, or `HypervisorUnavailable` (a reconnect is then under way)."""
        if self._closed:
            raise HypervisorUnavailable(f"the libvirt connection to {self.uri} is closed")
        if self._conn is None:
            self._ensure_reconnecting()
            raise HypervisorUnavailable(
                f"libvirtd is not reachable at {self.uri} ({self._lost_reason}); reconnecting"
            )
        return self._conn

    def domain(self, name: str) -> libvirt.virDomain:
        """The running domain `name`; `VMNotFound` when libvirt has no such running domain."""
        handle = self._handles.get(name)
        if handle is not None:
            return handle
        conn = self.connection()
        try:
            with self._bounded():
                handle = conn.lookupByName(name)
                active = handle.isActive()
        except libvirt.libvirtError as exc:
            raise self.translate(exc, domain=name) from exc
        if not active:
            raise VMNotFound(f"libvirt domain {name!r} is defined but not running")
        self._handles[name] = handle
        return handle

    def call(self, domain: str, fn: Callable[[libvirt.virDomain], T]) -> T:
        """`fn(dom)` on the running domain `domain`, libvirt's errors translated.

        A cached domain handle that went stale (the domain was destroyed and started again
        under the same name) is looked up once more.
        """
        for attempt in (0, 1):
            dom = self.domain(domain)
            try:
                with self._bounded():
                    return fn(dom)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == ERR_NO_DOMAIN and attempt == 0:
                    self._handles.pop(domain, None)
                    continue
                raise self.translate(exc, domain=domain) from exc
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _bounded(self) -> Iterator[None]:
        """At most `call_timeout` s: then the connection's socket is shut down (the call fails,
        the connection is re-opened). Keepalive cannot do this while a call blocks the loop."""
        with watchdog.guard(self.call_timeout, self._sockets) as fired:
            try:
                yield
            except libvirt.libvirtError as exc:
                if fired.is_set():
                    self._lost(exc)
                    raise HypervisorUnavailable(
                        f"libvirtd at {self.uri} did not answer within {self.call_timeout:g} s; reconnecting"
                    ) from exc
                raise

    def translate(self, exc: libvirt.libvirtError, *, domain: str) -> BlockPullError:
        """libvirt's error as BlockPull's: connection trouble, a missing domain, or the rest
        (`CommandFailed`, carrying libvirt's code as `error_class` for the caller to refine)."""
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code in _CONNECTION_ERRORS or not self._conn_alive():
            self._lost(exc)
            return HypervisorUnavailable(f"libvirtd at {self.uri} did not answer: {message}")
        if code == ERR_NO_DOMAIN or (code == ERR_OPERATION_INVALID and "not running" in message):
            self._handles.pop(domain, None)
            return VMNotFound(f"libvirt domain {domain!r} is not running at {self.uri}")
        return CommandFailed(message, error_class=str(code))

    # --- events --------------------------------------------------------------------------

    def _on_block_job(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        disk: str,
        job_type: int,
        status: int,
        _g: Any,
    ) -> None:
        jobs = self.jobs(dom.name())
        if status in (
            libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
            libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
            libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
        ):
            jobs.concluded[disk] = concluded_progress(jobs, disk, job_type, status)
            jobs.last.pop(disk, None)
        log.debug("libvirt: block job event %s %s type %s status %s", jobs.name, disk, job_type, status)
        jobs.wake()

    def _on_lifecycle(
        self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, _detail: int, _g: Any
    ) -> None:
        jobs = self.jobs(dom.name())
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            jobs.gone = True
            jobs.last.clear()
            self._handles.pop(jobs.name, None)
        elif event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            jobs.gone = False
            self._handles.pop(jobs.name, None)
        jobs.wake()

    # --- the end -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close for good: no reconnect, every waiter woken."""
        self._closed = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnector
        conn, self._conn = self._conn, None
        self._handles.clear()  # a domain handle holds a reference on its connection
        if conn is not None:
            self._release(conn)
        for jobs in self._domains.values():
            jobs.wake()
        # libvirt frees the connection's handles and timers through callbacks scheduled on the
        # loop: let them run before a caller closes the loop.
        del conn
        impl = libvirtaio.getCurrentImpl()
        if impl is not None and impl.loop is asyncio.get_running_loop():
            with contextlib.suppress(TimeoutError, AssertionError):
                async with asyncio.timeout(1.0):  # not wait_for: see blockpull.qmp
                    await impl.drain()


def job_id_of(domain: str, target: str) -> str:
    """A libvirt job's stable name: libvirt jobs have no id, one disk has at most one job."""
    return f"{domain}/{target}"


def concluded_progress(jobs: DomainJobs, target: str, job_type: int, status: int) -> Progress:
    """The concluded job an event describes, with the last offset seen (events carry none)."""
    last = jobs.last.get(target)
    length = last.length if last is not None else 0
    if status == libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED:
        offset, error = length, None
    elif status == libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED:
        offset, error = (last.offset if last is not None else 0), CANCELLED_ERROR
    else:
        offset, error = (last.offset if last is not None else 0), FAILED_WITHOUT_TEXT
    return Progress(
        job_id=job_id_of(jobs.name, target),
        status="concluded",
        offset=offset,
        length=length,
        speed=last.speed if last is not None else 0,
        paused=False,
        io_status="ok" if error is None else "failed",
        error=error,
        job_type=JOB_TYPES.get(job_type, str(job_type)),
    )


class LibvirtConnections:
    """The process's libvirt connections: one per URI, shared by every driver using it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._connections: dict[str, LibvirtConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, uri: str) -> LibvirtConnection:
        lock = self._locks.setdefault(uri, asyncio.Lock())
        async with lock:
            conn = self._connections.get(uri)
            if conn is None or conn.closed:
                conn = LibvirtConnection(uri, **self._options)
                self._connections[uri] = conn
            # A lost connection is being re-opened in the background; a never-opened one
            # (libvirtd was down at first use) is opened here.
            if not conn.connected and conn.connects == 0:
                await conn.open()
            return conn

    async def close_all(self) -> None:
        connections = list(self._connections.values())
        self._connections.clear()
        for conn in connections:
            with contextlib.suppress(Exception):
                await conn.close()

    def __len__(self) -> int:
        return sum(1 for conn in self._connections.values() if not conn.closed)
