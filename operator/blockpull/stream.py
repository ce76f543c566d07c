"""QEMU's block-stream job over QMP: the commands, with BlockPull's rules kept.

Owns: how a pull is asked of QEMU and how QEMU's job is read and steered: an explicit job id,
`auto-dismiss: false` (the outcome survives our absence) and `auto-finalize: false` (the chain
changes only when we say so, after the copied data is flushed: see `finalize`), one job per
disk, live bandwidth/pause/cancel, and deciding from the chain itself whether a job QEMU no
longer knows had pulled the disk. `blockpull.qmp_driver` puts these behind the driver
interface; the protocol sequences that use them live once in `blockpull.pull`.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from blockpull.chain import DiskChain, read_chain
from blockpull.driver import ChainImage, Progress, StartedJob, StreamRequest
from blockpull.errors import (
    BaseNotInChain,
    CommandFailed,
    DiskBusy,
    DiskNotFound,
    InvalidSpec,
    JobNotFound,
    QMPTimeout,
)
from blockpull.qmp import QMPConnection

_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
#: Events that concern a job's life; a subscriber re-reads the job when one arrives.
JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
#: How long `job-finalize` may take to conclude the job (it is a header write and a flush).
FINALIZE_TIMEOUT = 30.0


def chain_images(chain: DiskChain) -> tuple[ChainImage, ...]:
    return tuple(
        ChainImage(
            node=image.node_name,
            filename=image.filename,
            driver=image.driver,
            backing_name=image.backing_name,
            virtual_size=image.virtual_size,
        )
        for image in chain.images
    )


async def start_stream(conn: QMPConnection, request: StreamRequest) -> StartedJob:
    """Resolve the disk and base, refuse a busy disk, and start the job.

    Raises DiskNotFound / BaseNotInChain / DiskBusy / InvalidSpec with a clear message; nothing
    is started unless everything checks out. The job stops at `pending` when its copy is done:
    `finalize` then changes the chain durably.
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
        # The backing link goes only after the copied data is on disk: QEMU 7.2 rewrites the
        # header at finalize while the copied clusters' metadata may still be in its cache, and
        # a QEMU killed then reads zeros where the template's data was. Held at `pending`, the
        # chain is unchanged and a QEMU that dies loses nothing.
        "auto-finalize": False,
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
        device=chain.device,
        base_node=chain.images[base_index].node_name if base_index is not None else None,
        chain=chain_images(chain),
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
    async with conn.graph_lock:  # a paused job may conclude once resumed (see blockpull.chain)
        await _job_command(conn, "job-resume", {"id": job_id}, job_id)


async def cancel(conn: QMPConnection, job_id: str) -> None:
    """Ask QEMU to cancel; the job then ends CANCELLED (the chain stays as it was).

    A job held at `pending` is cancelled too: its copy is done but the chain never changed.
    """
    job = await find_job(conn, job_id)
    if job is None or job.concluded or job.status == "aborting":
        return
    # `block-job-cancel` refuses a paused job; `job-cancel` cancels either.
    async with conn.graph_lock:  # a held (pending/paused) job concludes on cancel
        await _job_command(conn, "job-cancel", {"id": job_id}, job_id)


async def finalize(conn: QMPConnection, job_id: str, node_name: str) -> Progress:
    """Change the chain of a job held at `pending`, durably: flush, finalize, flush.

    The first flush puts the copied clusters' metadata on disk while the header still names
    the backing file (a crash now loses nothing); `job-finalize` rewrites the header; the
    second flush makes that rewrite durable. Returns the concluded job.
    """
    await flush_disk(conn, node_name)
    async with conn.graph_lock:
        job = await progress(conn, job_id)
        if job.pending:
            await _job_command(conn, "job-finalize", {"id": job_id}, job_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINALIZE_TIMEOUT
    while not job.concluded:
        if loop.time() > deadline:
            raise QMPTimeout(f"job {job_id!r} did not conclude within {FINALIZE_TIMEOUT:g}s of job-finalize")
        await asyncio.sleep(0.01)
        job = await progress(conn, job_id)
    if job.error is None:
        await flush_disk(conn, node_name)
    return job


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
        if command not in ("job-dismiss", "job-finalize") and re.search(
            r"in state '(concluded|null|aborting)'", exc.message
        ):
            # The job ended between our read and this command: steering a finished job is
            # moot, and whoever waits on it reports the real outcome.
            return
        raise


def concerns(data: Any, job_id: str) -> bool:
    """Does an event's data name this job (JOB_STATUS_CHANGE: id; BLOCK_JOB_*: device)?"""
    return bool(data.get("id") == job_id or data.get("device") == job_id)


def _str_or_none(value: object) -> str | None:
    return str(value) if value is not None else None


async def pulled(conn: QMPConnection, disk: str, base: str | None) -> bool:
    """Does the disk's chain show a pull as done, for a job QEMU no longer knows?

    True when the disk no longer needs anything above `base` (or any backing file at all
    without a base); False when the chain is as before, i.e. the pull was lost (the job was
    dismissed by someone else, or QEMU restarted, which throws away unflushed progress).
    """
    chain = await read_chain(conn, disk)
    if base is None:
        return len(chain.images) == 1
    try:
        return chain.find_base(base) == 1
    except BaseNotInChain:
        return False


async def flush_disk(conn: QMPConnection, node_name: str) -> None:
    """Make a completed pull durable: flush the disk's image to storage.

    Measured on QEMU 7.2: when the job completes, the image header already says "no backing
    file" but the copied clusters' metadata may still sit in QEMU's qcow2 cache; a QEMU killed
    before its next flush (a guest fsync, or quit) leaves an image that reads zeros where the
    backing data was. QMP has no flush command, so we use HMP's `qemu-io NODE flush`.
    """
    if not _NODE_NAME.match(node_name) and not node_name.startswith("#"):
        raise InvalidSpec(f"not a node name: {node_name!r}")
    reply = await conn.execute("human-monitor-command", {"command-line": f"qemu-io {node_name} flush"})
    if isinstance(reply, str) and reply.strip():
        raise CommandFailed(f"flush of {node_name!r} failed: {reply.strip()}")
