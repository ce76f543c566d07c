"""What the libvirt benchmarks know about block jobs, read beside the agent, never through it.

Two sources, both independent of the code under test:

- `qemu_job_events(log)`: QEMU's own job events with QEMU's own timestamps, from the private
  libvirtd's log (`virtlab` logs libvirtd's QEMU monitor traffic: every `QEMU_MONITOR_RECV_EVENT`
  line holds the event as QEMU sent it). A monitor is tied to its domain by libvirt's
  `query-chardev` reply at the domain's start (the monitor socket's path names the domain);
  libvirt names a pull job `pull-<target>-<node>`, which gives the disk.
- `BlockJobEvents`: libvirt's `BLOCK_JOB_2` events as a client of libvirtd receives them (a
  connection of the benchmark's own, its event loop in a thread), with the arrival time: what
  the agent's connection receives at about the same moment.

QEMU stamps its events with the host's wall clock, comparable with `time.time()`.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

#: The reply to libvirt's `query-chardev` at a domain's start names its monitor socket:
#: `/var/lib/libvirt/qemu/domain-<id>-<name, cut to 20 characters>/monitor.sock`.
_MONITOR_OF = re.compile(
    r"QEMU_MONITOR_RECV_REPLY: mon=(0x[0-9a-f]+) reply=.*?/domain-\d+-([^/\"]+)/monitor\.sock"
)
_EVENT = re.compile(r"QEMU_MONITOR_RECV_EVENT: mon=(0x[0-9a-f]+) event=(\{.*\})\s*$")
#: libvirt's job name for a pull: `pull-vda-libvirt-3-format`.
_PULL_JOB = re.compile(r"^pull-([a-z]+)-")

#: libvirt's short name of a domain in its run-time paths (virDomainDefGetShortName).
SHORT_NAME = 20


@dataclass
class QemuJob:
    """One disk's pull jobs as QEMU reported them: the first time of each status, QEMU's clock."""

    domain: str
    target: str
    times: dict[str, float] = field(default_factory=dict)  # created, running, pending, concluded...
    created: int = 0  # how many jobs were created on this disk
    completed: float | None = None  # BLOCK_JOB_COMPLETED
    error: str | None = None


def _qemu_time(event: dict[str, Any]) -> float | None:
    stamp = event.get("timestamp") or {}
    if "seconds" not in stamp:
        return None
    return float(stamp["seconds"]) + float(stamp.get("microseconds", 0)) / 1e6


def qemu_job_events(log: Path, domains: Iterable[str]) -> dict[tuple[str, str], QemuJob]:
    """Pull jobs of `domains` in libvirtd's log, by (domain, target)."""
    by_short: dict[str, str] = {}
    for name in domains:
        short = name[:SHORT_NAME]
        if by_short.setdefault(short, name) != name:
            raise ValueError(f"domains {by_short[short]!r} and {name!r} share libvirt's short name")
    monitor: dict[str, str] = {}  # mon=0x... -> domain, as of this line (libvirt reuses pointers)
    jobs: dict[tuple[str, str], QemuJob] = {}
    with log.open(errors="replace") as lines:
        for line in lines:
            if "QEMU_MONITOR_RECV_" not in line:
                continue
            found = _MONITOR_OF.search(line) if "monitor.sock" in line else None
            if found:
                domain = by_short.get(found.group(2))
                if domain is not None:
                    monitor[found.group(1)] = domain
                else:
                    monitor.pop(found.group(1), None)
                continue
            found = _EVENT.search(line)
            if not found or found.group(1) not in monitor:
                continue
            event = json.loads(found.group(2))
            data = event.get("data") or {}
            name = event.get("event")
            job_id = str(data.get("id") if name == "JOB_STATUS_CHANGE" else data.get("device", ""))
            pull = _PULL_JOB.match(job_id)
            when = _qemu_time(event)
            if pull is None or when is None or name not in ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED"):
                continue
            key = (monitor[found.group(1)], pull.group(1))
            job = jobs.setdefault(key, QemuJob(*key))
            if name == "BLOCK_JOB_COMPLETED":
                if job.completed is None:
                    job.completed = when
                if data.get("error"):
                    job.error = str(data["error"])
            else:
                status = str(data.get("status"))
                job.times.setdefault(status, when)
                if status == "created":
                    job.created += 1
    return jobs


# --- libvirt's events, as a client sees them -------------------------------------------------------

#: virConnectDomainEventBlockJobStatus
COMPLETED, FAILED, CANCELED, READY = 0, 1, 2, 3
STATUS_NAMES = {COMPLETED: "completed", FAILED: "failed", CANCELED: "canceled", READY: "ready"}

_default_impl = threading.Lock()
_default_impl_registered = False


def _register_default_impl() -> None:
    """libvirt's default event loop, once per process, before the first connection."""
    global _default_impl_registered  # noqa: PLW0603 - once per process, as libvirt requires
    with _default_impl:
        if not _default_impl_registered:
            libvirt.virEventRegisterDefaultImpl()
            _default_impl_registered = True


@dataclass(frozen=True)
class BlockJobEvent:
    arrived: float  # time.time() when the callback ran
    domain: str
    disk: str  # the target (BLOCK_JOB_2 names disks by target)
    status: int


class BlockJobEvents:
    """`BLOCK_JOB_2` events of every domain of `uri`, recorded with their arrival time."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.Lock()
        self._events: list[BlockJobEvent] = []
        self._running = False
        self._conn: Any = None
        self._callback: int | None = None
        self._timer: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> BlockJobEvents:
        _register_default_impl()
        self._conn = libvirt.open(self.uri)
        self._callback = self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_event, None
        )
        # Wakes the loop every 100 ms, so that stop() is noticed.
        self._timer = libvirt.virEventAddTimeout(100, lambda *_: None, None)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="libvirt-events", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while self._running:
            libvirt.virEventRunDefaultImpl()

    def _on_event(self, _conn: Any, dom: Any, disk: str, _type: int, status: int, _opaque: Any) -> None:
        now = time.time()
        with self._lock:
            self._events.append(BlockJobEvent(now, str(dom.name()), str(disk), int(status)))

    def events(self) -> list[BlockJobEvent]:
        with self._lock:
            return list(self._events)

    def first(self, domain: str, disk: str, *statuses: int) -> BlockJobEvent | None:
        """The first event of `domain`'s `disk` with one of `statuses` (any status: none given)."""
        for event in self.events():
            if event.domain == domain and event.disk == disk and (not statuses or event.status in statuses):
                return event
        return None

    def wait(self, domain: str, disk: str, timeout: float) -> BlockJobEvent | None:
        """The first event that ends a job on `domain`'s `disk`, waiting at most `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.first(domain, disk, COMPLETED, FAILED, CANCELED)
            if found is not None:
                return found
            time.sleep(0.005)
        return None

    def job_info(self, domain: str, disk: str) -> dict[str, int]:
        """libvirt's `blockJobInfo` of the disk (empty: no job). Not `blockInfo`: see
        docs/libvirt.md (it crashes QEMU 7.2 while a job is concluded)."""
        info: dict[str, int] = self._conn.lookupByName(domain).blockJobInfo(disk, 0)
        return info

    def stop(self) -> None:
        if self._conn is None:
            return
        self._running = False
        if self._thread is not None:
            self._thread.join(5)
        if self._callback is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(self._callback)
        if self._timer is not None:
            libvirt.virEventRemoveTimeout(self._timer)
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()
        self._conn = None
