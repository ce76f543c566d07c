"""What a pull needs from a hypervisor: the block-job driver interface and its value types.

Owns: the vocabulary shared by every way BlockPull reaches a VM (QEMU's QMP monitor today,
libvirt's block-job API next): a request (`StreamRequest`), a job as seen right now
(`Progress`), how a job ended (`Outcome`), and the `BlockJobDriver` protocol. The protocol
sequences built on it (follow a job, conclude it durably, cancel and confirm, judge a vanished
job) are written once in `blockpull.pull`; the CLI and the agent only call those.

A driver hides its hypervisor's job model behind five job states the sequences rely on:
- running or paused: copying (or held); `offset`/`length` move.
- `pending`: the copy is done and the chain is NOT changed yet. A driver that can hold a job
  there (QMP with `auto-finalize: false`) does, so that nothing can be lost while nobody is
  watching; `finalize` then makes the chain change durable.
- `aborting`: a cancel is under way.
- `concluded`: ended, outcome known (`error` set on failure or cancel), kept until `dismiss`.
"""

from __future__ import annotations

import enum
import re
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from blockpull.errors import InvalidSpec

ON_ERROR_CHOICES = ("report", "stop", "enospc", "ignore")
#: `Progress.error` of a job that ended because it was cancelled: QEMU's own text
#: (strerror(ECANCELED)); other drivers use it too, so one rule reads every outcome.
CANCELLED_ERROR = "Operation canceled"
#: QEMU's rule for job ids. A driver whose jobs have no id of their own (libvirt) ignores
#: `StreamRequest.job_id` and names the job itself (`StartedJob.job_id`).
_JOB_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")


class Result(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Progress:
    """A job as the hypervisor reports it right now."""

    job_id: str
    status: str  # running, paused, pending, aborting, concluded (drivers map theirs onto these)
    offset: int
    length: int
    speed: int
    paused: bool
    io_status: str
    error: str | None
    #: The job's type (`stream`, `mirror`, `commit`, `backup`...): jobs of every type are listed.
    job_type: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.offset / self.length if self.length else 100.0

    @property
    def concluded(self) -> bool:
        return self.status in ("concluded", "null")

    @property
    def pending(self) -> bool:
        """Copy done, chain unchanged: waits for `finalize` (nothing is lost if QEMU dies now)."""
        return self.status == "pending"

    @property
    def ended(self) -> bool:
        """Nothing more will be copied: it waits for someone to finalize or collect it."""
        return self.concluded or self.pending


@dataclass(frozen=True)
class Outcome:
    """How a job ended. `error` is the hypervisor's own text when it failed (if it gives one)."""

    job_id: str
    result: Result
    offset: int
    length: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is Result.COMPLETED


@dataclass(frozen=True)
class StreamRequest:
    """What to pull: validated before anything is sent to the hypervisor."""

    disk: str
    job_id: str
    base: str | None = None
    bandwidth: int = 0
    on_error: str = "report"

    def __post_init__(self) -> None:
        if not _JOB_ID.match(self.job_id):
            raise InvalidSpec(
                f"job id {self.job_id!r} must start with a letter and hold only letters, "
                "digits, '-', '.', '_' (at most 128 characters)"
            )
        if self.bandwidth < 0:
            raise InvalidSpec(f"bandwidth must not be negative, got {self.bandwidth}")
        if self.on_error not in ON_ERROR_CHOICES:
            raise InvalidSpec(f"onError must be one of {', '.join(ON_ERROR_CHOICES)}, got {self.on_error!r}")
        if not self.disk:
            raise InvalidSpec("disk must not be empty")


@dataclass(frozen=True)
class ChainImage:
    """One image of a disk's backing chain, as the hypervisor has it open."""

    node: str  # QMP node-name; for libvirt the index form (vda[2])
    filename: str
    driver: str = ""
    #: The backing name recorded in this image's header (may be relative), if any.
    backing_name: str | None = None
    virtual_size: int = 0


@dataclass(frozen=True)
class StartedJob:
    """A job we started, with what the request resolved to."""

    job_id: str
    device: str  # what the hypervisor streams into (QMP node-name; libvirt target)
    base_node: str | None  # the kept base, in the driver's naming; None: pull everything
    chain: tuple[ChainImage, ...]  # the chain at start, active image first
    released_images: tuple[str, ...]  # files the disk no longer needs once completed


class JobWatch(Protocol):
    """Notifications about one job: `changed` returns when something may have happened to it."""

    async def changed(self, timeout: float) -> bool:
        """True when a notification arrived within `timeout` s; False on timeout.

        Raises `Disconnected` once the hypervisor connection is gone.
        """
        ...


class BlockJobDriver(Protocol):
    """Everything a pull needs from one VM's hypervisor connection. Every call is bounded."""

    #: The hypervisor can pause and resume a job.
    can_pause: bool
    #: What users call the thing the driver talks to, e.g. "QMP socket /run/x.qmp".
    describe: str

    async def start(self, request: StreamRequest) -> StartedJob:
        """Resolve disk and base, refuse a busy disk, start the job (held at `pending`)."""
        ...

    async def find_job(self, job_id: str) -> Progress | None: ...

    async def list_jobs(self) -> list[Progress]: ...

    async def blocking_jobs(self, disk: str) -> list[Progress]:
        """The jobs that hold `disk` (for a DiskBusy that names them)."""
        ...

    def collect_command(self, job: Progress) -> str:
        """The one command a node admin runs to collect an ended job nobody collected."""
        ...

    async def chain(self, disk: str) -> tuple[ChainImage, ...]:
        """The disk's backing chain now, active image first."""
        ...

    async def set_speed(self, job_id: str, bytes_per_second: int) -> None: ...

    async def pause(self, job_id: str) -> None:
        """Pause; drivers without `can_pause` raise `Unsupported`."""
        ...

    async def resume(self, job_id: str) -> None: ...

    async def cancel(self, job_id: str) -> None:
        """Ask for a cancel; the job then concludes cancelled (the chain stays intact)."""
        ...

    async def finalize(self, job_id: str, device: str | None) -> None:
        """Durably apply a `pending` job's chain change: flush, finalize, flush.

        `device` is what the job streams into (`StartedJob.device`); None: ask the job itself.
        Returns once the job is concluded and the changed image is on stable storage.
        """
        ...

    async def make_durable(self, device: str | None) -> None:
        """Flush the disk's image (a job that concluded without passing `pending` with us);
        nothing when the device is not known."""
        ...

    async def dismiss(self, job_id: str) -> None:
        """Forget a concluded job. Only once its outcome is recorded somewhere safe."""
        ...

    async def pulled(self, disk: str, base: str | None) -> bool:
        """Does the disk's chain show the pull as done (nothing above `base` left)?"""
        ...

    def watch(self, job_id: str) -> AbstractAsyncContextManager[JobWatch]:
        """Notifications about `job_id` while the context is open."""
        ...

    @property
    def closed(self) -> bool: ...

    async def close(self) -> None: ...
