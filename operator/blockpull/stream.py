"""Driving one QEMU `block-stream` job: start, follow, steer, finish.

Owns: the rules BlockPull keeps with QEMU for a pull: an explicit job id and `auto-dismiss:
false` (so an outcome survives our absence), one job per disk, the job's progress and outcome,
live bandwidth/pause/cancel, re-attaching to a job by id, and deciding from the chain itself
what happened to a job QEMU no longer knows. The CLI and the agent are thin layers over this.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from blockpull.chain import DiskChain, read_chain
from blockpull.errors import (
    BaseNotInChain,
    CommandFailed,
    DiskBusy,
    DiskNotFound,
    InvalidSpec,
    JobNotFound,
)
from blockpull.qmp import QMPConnection, Subscription

ON_ERROR_CHOICES = ("report", "stop", "enospc", "ignore")
#: QEMU's text for a job that ended because it was cancelled (strerror(ECANCELED)).
_CANCELLED_TEXT = "Operation canceled"
_JOB_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
_JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
#: How often a waiter re-reads the job when no event arrives: a safety net, not the mechanism
#: (completion is seen from QEMU's events). Also the progress refresh cadence.
DEFAULT_POLL_INTERVAL = 1.0


class Result(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Progress:
    """A job as QEMU reports it right now (`query-block-jobs` + `query-jobs`)."""

    job_id: str
    status: str  # QEMU job status: created, running, paused, ready, waiting, pending, concluded...
    offset: int
    length: int
    speed: int
    paused: bool
    io_status: str
    error: str | None
    #: QEMU's job type (`stream`, `mirror`, `commit`, `backup`...); `query-jobs` lists them all.
    job_type: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.offset / self.length if self.length else 100.0

    @property
    def concluded(self) -> bool:
        return self.status in ("concluded", "null")


@dataclass(frozen=True)
class Outcome:
    """How a job ended. `error` is QEMU's own text when it failed."""

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
    """What to pull: validated before anything is sent to QEMU."""

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
class StartedJob:
    """A stream job we started or re-attached to, with what it resolved to."""

    job_id: str
    chain: DiskChain | None  # None when re-attached without resolving the disk
    base_node: str | None
    released_images: tuple[str, ...]


async def start_stream(conn: QMPConnection, request: StreamRequest) -> StartedJob:
    """Resolve the disk and base, refuse a busy disk, and start the job.

    Raises DiskNotFound / BaseNotInChain / DiskBusy / InvalidSpec with a clear message; nothing
    is started unless everything checks out.
    """
    chain = await read_chain(conn, request.disk)
    base_index = chain.find_base(request.base) if request.base is not None else None
    arguments: dict[str, Any] = {
        "job-id": request.job_id,
        "device": chain.device,
        "speed": request.bandwidth,
        "on-error": request.on_error,
        # The outcome must outlive us: QEMU keeps a concluded job until we dismiss it.
        "auto-dismiss": False,
    }
    if base_index is not None:
        arguments["base-node"] = chain.images[base_index].node_name
        arguments["backing-file"] = chain.backing_name_for(base_index)
    # No pre-check for other jobs on the chain: QEMU refuses atomically ("Node ... is busy"),
    # which a check of ours could only race with.
    async with conn.graph_lock:
        try:
            await conn.execute("block-stream", arguments)
        except CommandFailed as exc:
            raise _classify_start_error(exc, request) from exc
    return StartedJob(
        job_id=request.job_id,
        chain=chain,
        base_node=chain.images[base_index].node_name if base_index is not None else None,
        released_images=tuple(chain.released_by(base_index)),
    )


def _classify_start_error(exc: CommandFailed, request: StreamRequest) -> Exception:
    text = exc.message
    if "Cannot find device" in text:
        return DiskNotFound(f"QEMU has no disk {request.disk!r}: {text}")
    if "is not a backing image" in text or "in the backing chain" in text:
        return BaseNotInChain(text)
    if "is busy" in text or "in use by block job" in text:
        return DiskBusy(f"disk {request.disk!r} is busy: {text}")
    if "already in use" in text and "Job ID" in text:
        return DiskBusy(f"a job with id {request.job_id!r} already exists: {text}")
    return exc


# --- reading a job ------------------------------------------------------------------------


async def find_job(conn: QMPConnection, job_id: str) -> Progress | None:
    """The job as QEMU knows it now, or None when QEMU has no job by that id."""
    block_jobs, jobs = await asyncio.gather(conn.execute("query-block-jobs"), conn.execute("query-jobs"))
    job = next((j for j in jobs if j.get("id") == job_id), None)
    if job is None:
        return None
    block_job: dict[str, Any] = next((j for j in block_jobs if j.get("device") == job_id), {})
    # Status and progress from the same reply: the job may conclude between the two queries,
    # and a "concluded" status with the other reply's older offset would report a finished
    # pull as 70% done.
    return Progress(
        job_id=job_id,
        status=str(job["status"]),
        offset=int(job.get("current-progress", block_job.get("offset", 0))),
        length=int(job.get("total-progress", block_job.get("len", 0))),
        speed=int(block_job.get("speed", 0)),
        paused=bool(block_job.get("paused", job["status"] == "paused")),
        io_status=str(block_job.get("io-status", "ok")),
        error=_str_or_none(job.get("error")),
        job_type=str(job.get("type", block_job.get("type", ""))),
    )


async def list_jobs(conn: QMPConnection) -> list[Progress]:
    jobs = await conn.execute("query-jobs")
    found = [await find_job(conn, str(job["id"])) for job in jobs]
    return [job for job in found if job is not None]


async def progress(conn: QMPConnection, job_id: str) -> Progress:
    job = await find_job(conn, job_id)
    if job is None:
        raise JobNotFound(f"QEMU has no block job {job_id!r}")
    return job


def outcome_of(job: Progress) -> Outcome | None:
    """The outcome of a concluded job, from QEMU's own record of it."""
    if not job.concluded:
        return None
    if job.error is None:
        result = Result.COMPLETED
    elif job.error == _CANCELLED_TEXT:
        result = Result.CANCELLED
    else:
        result = Result.FAILED
    error = job.error if result is Result.FAILED else None
    return Outcome(job.job_id, result, job.offset, job.length, error)


# --- steering -----------------------------------------------------------------------------


async def set_bandwidth(conn: QMPConnection, job_id: str, bytes_per_second: int) -> None:
    if bytes_per_second < 0:
        raise InvalidSpec(f"bandwidth must not be negative, got {bytes_per_second}")
    await _job_command(conn, "block-job-set-speed", {"device": job_id, "speed": bytes_per_second}, job_id)


async def pause(conn: QMPConnection, job_id: str) -> None:
    job = await progress(conn, job_id)
    if job.paused or job.concluded:
        return  # idempotent: the agent re-applies spec on every resync
    await _job_command(conn, "job-pause", {"id": job_id}, job_id)


async def resume(conn: QMPConnection, job_id: str) -> None:
    job = await progress(conn, job_id)
    # QEMU errors on resuming a job that is not paused; a job stopped by on-error=stop/enospc
    # is paused with io-status failed/nospace, and resume is its retry.
    if not job.paused:
        return
    await _job_command(conn, "job-resume", {"id": job_id}, job_id)


async def cancel(conn: QMPConnection, job_id: str) -> None:
    """Ask QEMU to cancel; the job then ends CANCELLED (or COMPLETED if it won the race)."""
    job = await find_job(conn, job_id)
    if job is None or job.concluded or job.status == "aborting":
        return
    # `block-job-cancel` refuses a paused job; `job-cancel` cancels either.
    await _job_command(conn, "job-cancel", {"id": job_id}, job_id)


async def dismiss(conn: QMPConnection, job_id: str) -> None:
    """Forget a concluded job. Only call once its outcome is recorded somewhere safe."""
    async with conn.graph_lock:
        job = await find_job(conn, job_id)
        if job is None:
            return
        if job.status != "concluded":
            raise CommandFailed(f"job {job_id!r} is {job.status}, not concluded", "GenericError")
        await _job_command(conn, "job-dismiss", {"id": job_id}, job_id)


async def _job_command(conn: QMPConnection, command: str, arguments: dict[str, Any], job_id: str) -> None:
    try:
        await conn.execute(command, arguments)
    except CommandFailed as exc:
        if "not found" in exc.message.lower() or "No job with ID" in exc.message:
            raise JobNotFound(f"QEMU has no block job {job_id!r}") from exc
        if command != "job-dismiss" and re.search(r"in state '(concluded|null|aborting)'", exc.message):
            # The job ended between our read and this command: steering a finished job is
            # moot, and whoever waits on it reports the real outcome.
            return
        raise


# --- waiting --------------------------------------------------------------------------------

ProgressCallback = Callable[[Progress], Awaitable[None] | None]


async def wait_for_outcome(
    conn: QMPConnection,
    job_id: str,
    *,
    on_progress: ProgressCallback | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> Outcome:
    """Follow a job until it concludes and return its outcome (the job is NOT dismissed).

    Completion is taken from QEMU's events the moment they arrive; between events the job is
    re-read every `poll_interval` seconds for progress (and as a net, should our event queue
    ever overflow). Raises `Disconnected` if QEMU goes away, `JobNotFound` if the job vanishes.
    """
    sub = conn.subscribe(_JOB_EVENTS)
    try:
        return await _follow(conn, job_id, sub, on_progress, poll_interval)
    finally:
        conn.unsubscribe(sub)


async def _follow(
    conn: QMPConnection,
    job_id: str,
    sub: Subscription,
    on_progress: ProgressCallback | None,
    poll_interval: float,
) -> Outcome:
    loop = asyncio.get_running_loop()
    next_poll = 0.0
    while True:
        if loop.time() >= next_poll or sub.overflowed:
            sub.overflowed = False
            job = await find_job(conn, job_id)
            if job is None:
                raise JobNotFound(f"QEMU has no block job {job_id!r} (dismissed by someone else?)")
            outcome = outcome_of(job)
            if outcome is not None:
                return outcome
            if on_progress is not None:
                maybe = on_progress(job)
                if maybe is not None:
                    await maybe
            next_poll = loop.time() + poll_interval
        try:
            event = await sub.get(timeout=max(0.0, next_poll - loop.time()))
        except TimeoutError:
            continue
        if _concerns(event.data, job_id) and (
            event.name != "JOB_STATUS_CHANGE" or event.data.get("status") == "concluded"
        ):
            # Re-read rather than trust the event alone: query-jobs carries the error text
            # and the final offset, and says COMPLETED when a cancel lost the race.
            next_poll = 0.0


def _concerns(data: Any, job_id: str) -> bool:
    return bool(data.get("id") == job_id or data.get("device") == job_id)


def _str_or_none(value: object) -> str | None:
    return str(value) if value is not None else None


async def judge_from_chain(conn: QMPConnection, disk: str, base: str | None) -> Result | None:
    """What became of a job QEMU no longer knows, judged from the disk's chain itself.

    COMPLETED when the disk no longer needs anything above `base` (or any backing file at all
    without a base); None when the chain is as before, i.e. the pull was lost (the job was
    dismissed by someone else, or QEMU restarted, which throws away unflushed progress).
    """
    chain = await read_chain(conn, disk)
    if base is None:
        return Result.COMPLETED if len(chain.images) == 1 else None
    try:
        return Result.COMPLETED if chain.find_base(base) == 1 else None
    except BaseNotInChain:
        return None


async def flush_disk(conn: QMPConnection, node_name: str) -> None:
    """Make a completed pull durable: flush the disk's image to storage.

    Measured on QEMU 7.2: when the job completes, the image header already says "no backing
    file" but the copied clusters' metadata may still sit in QEMU's qcow2 cache; a QEMU killed
    before its next flush (a guest fsync, or quit) leaves an image that reads zeros where the
    backing data was. QMP has no flush command, so we use HMP's `qemu-io NODE flush`.
    """
    if not _JOB_ID.match(node_name) and not node_name.startswith("#"):
        raise InvalidSpec(f"not a node name: {node_name!r}")
    reply = await conn.execute("human-monitor-command", {"command-line": f"qemu-io {node_name} flush"})
    if isinstance(reply, str) and reply.strip():
        raise CommandFailed(f"flush of {node_name!r} failed: {reply.strip()}")
