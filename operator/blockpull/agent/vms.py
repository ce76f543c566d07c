"""One shared QMP connection per VM socket.

Owns: handing every BlockPull of a VM the same live connection (the agent's own monitor),
connecting on first use and again after QEMU went away, and closing them all at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib

from blockpull.qmp import QMPConnection
from blockpull.qmp_driver import QMPDriver


class VMConnections:
    def __init__(self, *, connect_timeout: float, command_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._connections: dict[str, QMPConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, socket_path: str) -> QMPConnection:
        """The live connection to this socket, connecting if there is none (bounded)."""
        lock = self._locks.setdefault(socket_path, asyncio.Lock())
        async with lock:  # two BlockPulls of one VM must not open two sessions
            conn = self._connections.get(socket_path)
            if conn is not None and not conn.closed:
                return conn
            conn = await QMPConnection.open(
                socket_path,
                connect_timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                client_name="blockpull-agent",
            )
            self._connections[socket_path] = conn
            return conn

    async def close_all(self) -> None:
        connections = list(self._connections.values())
        self._connections.clear()
        for conn in connections:
            with contextlib.suppress(Exception):
                await conn.close()

    async def driver(self, socket_path: str) -> QMPDriver:
        """The block-job driver over this VM's shared connection."""
        return QMPDriver(await self.get(socket_path))

    def __len__(self) -> int:
        return sum(1 for conn in self._connections.values() if not conn.closed)
