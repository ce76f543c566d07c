"""How the agent reaches a VM: the `VMs` interface, and its QMP implementation.

Owns: turning (namespace, `spec.vm`) into a block-job driver for that VM. `VMConnections`
does it through the socket template and one shared QMP connection per VM socket (the agent's
own monitor), connecting on first use and again after QEMU went away, and closing them all at
shutdown. Another hypervisor API (libvirt) implements `VMs` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from blockpull.agent.settings import SocketTemplate
from blockpull.driver import BlockJobDriver
from blockpull.qmp import QMPConnection
from blockpull.qmp_driver import QMPDriver


class VMs(Protocol):
    """The VMs of this node, as block-job drivers."""

    def locate(self, namespace: str, vm: str) -> str:
        """Where the VM is reached (a socket path, a domain); raises InvalidSpec when the names
        cannot be reached safely. Cheap and without I/O."""
        ...

    async def driver_for(self, namespace: str, vm: str) -> BlockJobDriver:
        """A live driver for the VM (bounded; VMNotFound / QEMUUnavailable while it is not)."""
        ...

    async def close_all(self) -> None: ...


class VMConnections:
    """`VMs` over QMP: one shared connection per VM socket, found by the socket template."""

    def __init__(self, template: SocketTemplate, *, connect_timeout: float, command_timeout: float) -> None:
        self._template = template
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

    def locate(self, namespace: str, vm: str) -> str:
        return self._template.path_for(namespace, vm)

    async def driver_for(self, namespace: str, vm: str) -> QMPDriver:
        return QMPDriver(await self.get(self.locate(namespace, vm)))

    def __len__(self) -> int:
        return sum(1 for conn in self._connections.values() if not conn.closed)
