"""A bound on libvirt calls that libvirt itself does not give.

libvirt's calls are synchronous and, with libvirtaio, run on the asyncio loop. Keepalive is
driven by timers on that same loop, so while a call blocks (a libvirtd that was stopped or
hangs keeps its socket and answers nothing) keepalive never fires and the call blocks the
whole process for as long as the daemon hangs (measured: a SIGSTOPped libvirtd blocked
`getLibVersion` until SIGCONT, 9+ minutes). A call cannot be interrupted from Python, and its
socket is libvirt's; but a socket can be shut down from any thread: `guard` arms a timer
thread that, when a call outlives its bound, shuts down the connection's UNIX socket. The
blocked call then fails at once (libvirt sees EOF), the close callback fires, and the
connection is re-opened like after a libvirtd restart.

The connection's socket is found as the AF_UNIX socket(s) the open created whose peer is the
daemon's socket path (libvirt does not expose its file descriptor).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator


def socket_fds() -> dict[int, str]:
    """This process's socket file descriptors (fd: `socket:[inode]`)."""
    found: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                link = os.readlink(f"/proc/self/fd/{name}")
                if link.startswith("socket:"):
                    found[int(name)] = link
    return found


def _peer(fd: int) -> str | None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        peer = sock.getpeername()
        return peer if isinstance(peer, str) else None
    except OSError:
        return None
    finally:
        sock.close()


def new_daemon_sockets(before: dict[int, str], daemon_socket: str | None) -> dict[int, str]:
    """The UNIX sockets opened since `before` that are connected to libvirtd (its socket path
    when known, else any path under a `libvirt` directory)."""
    found: dict[int, str] = {}
    for fd, link in socket_fds().items():
        if before.get(fd) == link:
            continue
        peer = _peer(fd)
        if peer and (peer == daemon_socket if daemon_socket else "libvirt" in peer):
            found[fd] = link
    return found


def shut_down(sockets: dict[int, str]) -> None:
    """Shut the sockets down (both ways), if they are still the ones we found."""
    current = socket_fds()
    for fd, link in sockets.items():
        if current.get(fd) != link:
            continue  # closed and reused for something else: not ours any more
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=os.dup(fd))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()


@contextlib.contextmanager
def guard(
    bound: float,
    sockets: dict[int, str] | None,
    *,
    before: dict[int, str] | None = None,
    daemon_socket: str | None = None,
) -> Iterator[threading.Event]:
    """Run the body with a bound: after `bound` s the connection's sockets are shut down.

    `sockets`: the connection's sockets; for an open that has none yet, `before` (the sockets
    that existed before it) and `daemon_socket` find them when the bound expires. The yielded
    event is set when the guard fired.
    """
    fired = threading.Event()

    def expire() -> None:
        targets = sockets if sockets is not None else new_daemon_sockets(before or {}, daemon_socket)
        fired.set()
        shut_down(targets)

    timer = threading.Timer(bound, expire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
