"""Recording QEMU's events on a monitor of their own.

A `QemuWatcher` holds an extra monitor (`QemuVM(extra_monitors=1)`) and records every event
with the time it arrived (`time.monotonic()`) and QEMU's own timestamp, so a benchmark can
time a job inside QEMU from `created` to `concluded` while the code under test talks on
another monitor. Memory is bounded: the oldest records are dropped past `maxlen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

from qemu.qmp import EventListener, Message, QMPClient
from qemu.qmp.protocol import Runstate

from qemulab import qmp
from qemulab.errors import LabError
from qemulab.qmp import StrPath


@dataclass(frozen=True)
class RecordedEvent:
    """One QMP event: `seq` counts from 1 in arrival order; `received` is `time.monotonic()`
    on arrival; `qemu_time` is QEMU's timestamp (seconds since the epoch) or None."""

    seq: int
    name: str
    data: dict[str, Any]
    received: float
    qemu_time: float | None

    @property
    def job_id(self) -> str | None:
        """The job the event is about: `id` of JOB_STATUS_CHANGE, `device` of BLOCK_JOB_*."""
        if self.name == "JOB_STATUS_CHANGE":
            return _str_or_none(self.data.get("id"))
        if self.name.startswith("BLOCK_JOB_"):
            return _str_or_none(self.data.get("device"))
        return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


class QemuWatcher:
    """Records the events arriving on one monitor socket.

    `names` limits what is recorded (default: everything). Use as `async with
    QemuWatcher(vm.extra_sockets[0]) as w:` or `await w.start()` ... `await w.stop()`. The
    watcher belongs to the event loop it started in.
    """

    def __init__(
        self,
        socket: StrPath,
        *,
        names: Iterable[str] | None = None,
        maxlen: int = 10_000,
        connect_timeout: float = 5.0,
    ) -> None:
        self.socket = socket
        self.names = frozenset(names) if names is not None else None
        self.connect_timeout = connect_timeout
        self._records: deque[RecordedEvent] = deque(maxlen=maxlen)
        self._seq = 0
        #: How many records were dropped to respect `maxlen`.
        self.dropped = 0
        self._client: QMPClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._disconnected = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> Self:
        """Connect and start recording."""
        if self._client is not None:
            raise LabError("watcher already started")
        self._changed = asyncio.Event()
        self._disconnected = False
        client = await qmp.connect(self.socket, timeout=self.connect_timeout, name="qemulab-watch")
        self._client = client
        # The default listener gets every event; draining it keeps the client's memory flat.
        self._tasks = [
            asyncio.create_task(self._record_loop(client.events), name="qemulab-watch-events"),
            asyncio.create_task(self._state_loop(client), name="qemulab-watch-state"),
        ]
        return self

    async def stop(self) -> None:
        """Stop recording and disconnect (the records stay readable)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        client, self._client = self._client, None
        if client is not None:
            await qmp.disconnect_quietly(client)
            client.events.clear()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        """Whether the monitor connection is up (False once QEMU went away)."""
        return self._client is not None and not self._disconnected

    async def _record_loop(self, listener: EventListener) -> None:
        async for message in listener:
            if self.names is None or message.get("event") in self.names:
                self._record(message)

    async def _state_loop(self, client: QMPClient) -> None:
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        self._disconnected = True
        self._notify()

    def _record(self, message: Message) -> None:
        self._seq += 1
        if len(self._records) == self._records.maxlen:
            self.dropped += 1
        stamp = message.get("timestamp")
        qemu_time: float | None = None
        if isinstance(stamp, dict):
            qemu_time = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        data = message.get("data")
        self._records.append(
            RecordedEvent(
                seq=self._seq,
                name=str(message.get("event")),
                data=dict(data) if isinstance(data, dict) else {},
                received=time.monotonic(),
                qemu_time=qemu_time,
            )
        )
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ---------------------------------------------------------------- reading

    @property
    def last_seq(self) -> int:
        """The `seq` of the latest event (0 if none): pass it as `since` to wait for newer."""
        return self._seq

    def events(
        self, name: str | None = None, *, job_id: str | None = None, since: int = 0
    ) -> list[RecordedEvent]:
        """Recorded events (oldest first), optionally of one name, one job, after `since`."""
        return [
            ev
            for ev in self._records
            if ev.seq > since
            and (name is None or ev.name == name)
            and (job_id is None or ev.job_id == job_id)
        ]

    def clear(self) -> None:
        """Forget the records (the sequence numbers go on)."""
        self._records.clear()

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[RecordedEvent], bool] | None = None,
        *,
        job_id: str | None = None,
        since: int = 0,
        timeout: float = 10.0,
    ) -> RecordedEvent:
        """The first recorded event (already arrived or coming) matching, after `since`.

        Raises `TimeoutError`, or `LabError` if the connection is lost first.
        """
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events(name, job_id=job_id, since=since):
                if predicate is None or predicate(ev):
                    return ev
            if self._disconnected:
                raise LabError(f"monitor {self.socket} disconnected while waiting for {name}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {name} event within {timeout} s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def wait_job_status(
        self, job_id: str, status: str, *, since: int = 0, timeout: float = 10.0
    ) -> RecordedEvent:
        """The JOB_STATUS_CHANGE of `job_id` to `status`."""
        return await self.wait_for(
            "JOB_STATUS_CHANGE",
            lambda ev: ev.data.get("status") == status,
            job_id=job_id,
            since=since,
            timeout=timeout,
        )

    def job_statuses(self, job_id: str) -> list[tuple[str, float]]:
        """The job's status changes as (status, monotonic arrival time), oldest first."""
        return [
            (str(ev.data.get("status")), ev.received)
            for ev in self.events("JOB_STATUS_CHANGE", job_id=job_id)
        ]

    def job_duration(
        self,
        job_id: str,
        *,
        start: str = "created",
        end: str = "concluded",
        clock: Literal["qemu", "monotonic"] = "qemu",
    ) -> float | None:
        """Seconds between the job's `start` and `end` statuses (the last occurrence of each,
        if the id was reused), or None if either was not seen.

        `clock="qemu"` uses QEMU's own event timestamps (wall clock, microseconds, no
        delivery delay); `"monotonic"` the local arrival times.
        """
        times: dict[str, float] = {}
        for ev in self.events("JOB_STATUS_CHANGE", job_id=job_id):
            status = ev.data.get("status")
            stamp = ev.qemu_time if clock == "qemu" else ev.received
            if isinstance(status, str) and stamp is not None:
                times[status] = stamp
        if start not in times or end not in times:
            return None
        return times[end] - times[start]
