"""Short QMP conversations with bounded time, async and sync.

qemu.qmp 0.0.6 has no timeouts of its own: every connect and execute here runs under
`asyncio.wait_for`. A `-qmp` socket serves ONE client: these helpers always disconnect, so
they never keep the monitor from the code under test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from qemu.qmp import QMPClient

T = TypeVar("T")

#: Default bound for one connect or one command, in seconds.
DEFAULT_TIMEOUT = 5.0

StrPath = str | os.PathLike[str]


async def connect(socket: StrPath, *, timeout: float = DEFAULT_TIMEOUT, name: str = "qemulab") -> QMPClient:
    """A connected client (greeting and capabilities done), or `TimeoutError`/`ConnectError`.

    Its default listener `client.events` queues every event until read: a client that lives
    long must drain it (as `QemuWatcher` does) or its memory grows.
    """
    client = QMPClient(name)
    try:
        await asyncio.wait_for(client.connect(os.fspath(socket)), timeout)
    except BaseException:
        await disconnect_quietly(client)
        raise
    return client


async def disconnect_quietly(client: QMPClient, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Disconnect, ignoring the errors of a peer that already went away."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), timeout)


async def execute_once(
    socket: StrPath,
    command: str,
    arguments: Mapping[str, object] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> object:
    """Connect, run one command, disconnect. Each step is bounded by `timeout`.

    Raises qemu.qmp's `ExecuteError` when QEMU rejects the command, `ConnectError` when the
    socket does not answer, `TimeoutError` when a step takes too long.
    """
    client = await connect(socket, timeout=timeout)
    try:
        return await asyncio.wait_for(client.execute(command, arguments), timeout)
    finally:
        await disconnect_quietly(client, timeout)


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    With no event loop running in this thread it uses `asyncio.run`; inside a running loop
    (a sync helper called from an async test) it runs the coroutine in a fresh loop on a
    helper thread and blocks until it is done. The coroutine must create its own QMP clients:
    a client belongs to the loop it connected in.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(factory))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qemulab-sync") as pool:
        return pool.submit(asyncio.run, _as_coroutine(factory)).result()


async def _as_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


def qmp_execute_once(
    socket: StrPath,
    command: str,
    arguments: Mapping[str, object] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> object:
    """Synchronous `execute_once`, usable from sync and async code alike (see `run_sync`)."""
    return run_sync(lambda: execute_once(socket, command, arguments, timeout=timeout))
