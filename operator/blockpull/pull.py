"""The protocol sequences of a pull, written once over the driver interface.

Owns: following a job until it has ended, concluding it durably (finalize with flushes, record
the outcome, only then dismiss), cancelling and waiting for the hypervisor to confirm, reading
an outcome from a concluded job, and saying which jobs hold a busy disk. The CLI and the agent
call these; neither repeats them.

The order of `conclude` is the durability contract: the chain changes only after the copied
data is on disk, and the job is forgotten only after its outcome is recorded. A process that
dies anywhere in between leaves the job for the next one to finish (`pending` or `concluded`),
never a disk that lost data and never a lost outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from blockpull.driver import CANCELLED_ERROR, BlockJobDriver, Outcome, Progress, Result
from blockpull.errors import CommandFailed, JobNotFound
from blockpull.quantity import progress_text

#: How often a followed job is re-read when no notification arrives: progress refresh and a
#: safety net; outcomes come from the hypervisor's events at once.
DEFAULT_POLL_INTERVAL = 1.0

ProgressCallback = Callable[[Progress], Awaitable[None] | None]
Recorder = Callable[[Outcome], Awaitable[None]]


def outcome_of(job: Progress) -> Outcome | None:
    """The outcome of a concluded job, from the hypervisor's own record of it."""
    if not job.concluded:
        return None
    if job.error is None:
        result = Result.COMPLETED
    elif job.error == CANCELLED_ERROR:
        result = Result.CANCELLED
    else:
        result = Result.FAILED
    return Outcome(job.job_id, result, job.offset, job.length, job.error if result is Result.FAILED else None)


def _has_ended(job: Progress) -> bool:
    return job.ended


def _is_concluded(job: Progress) -> bool:
    return job.concluded


async def follow(
    driver: BlockJobDriver,
    job_id: str,
    *,
    on_progress: ProgressCallback | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    until: Callable[[Progress], bool] = _has_ended,
) -> Progress:
    """Follow a job until `until` holds (by default: it has ended, `pending` or `concluded`).

    The job is re-read whenever the hypervisor notifies about it and at least every
    `poll_interval` seconds, calling `on_progress` with each reading before the end. Raises
    `JobNotFound` if the job vanishes, `Disconnected` if the hypervisor goes away.
    """
    async with driver.watch(job_id) as watch:
        while True:
            job = await driver.find_job(job_id)
            if job is None:
                raise JobNotFound(f"no block job {job_id!r} any more (dismissed by someone else?)")
            if until(job):
                return job
            if on_progress is not None:
                maybe = on_progress(job)
                if maybe is not None:
                    await maybe
            await watch.changed(poll_interval)


async def conclude(driver: BlockJobDriver, job_id: str, device: str | None, *, record: Recorder) -> Outcome:
    """See an ended job through, durably: finalize (flush, change the chain, flush), record the
    outcome with `record`, then dismiss the job.

    A job held at `pending` is finalized here. A job that concluded without us (a driver or a
    client that finalizes by itself) is flushed before a completion is recorded. `record`
    failing leaves the job in place for the next attempt: it is never dismissed unrecorded.
    """
    job = await driver.find_job(job_id)
    if job is None:
        raise JobNotFound(f"no block job {job_id!r} any more (dismissed by someone else?)")
    if job.pending:
        await driver.finalize(job_id, device)
        job = await driver.find_job(job_id)
        if job is None:
            raise JobNotFound(f"block job {job_id!r} vanished while being finalized")
    elif not job.concluded:
        raise CommandFailed(f"job {job_id!r} is {job.status}; it has not ended")
    elif job.error is None:
        await driver.make_durable(device)
    outcome = outcome_of(job)
    assert outcome is not None  # concluded by now
    await record(outcome)
    with contextlib.suppress(JobNotFound):
        await driver.dismiss(job_id)
    return outcome


async def cancel_and_confirm(
    driver: BlockJobDriver, job_id: str, *, timeout: float, poll_interval: float = DEFAULT_POLL_INTERVAL
) -> Progress | None:
    """Cancel a job and wait (at most `timeout` s) until it has concluded.

    Returns the concluded job (CANCELLED, or COMPLETED if it had finalized before the cancel
    arrived), or None when the hypervisor did not confirm in time. Nothing is dismissed.
    A job held at `pending` is cancelled as well: the chain stays as it was.
    """
    await driver.cancel(job_id)
    try:
        async with asyncio.timeout(timeout):
            return await follow(driver, job_id, poll_interval=poll_interval, until=_is_concluded)
    except TimeoutError:
        return None


def job_state(job: Progress) -> str:
    """A job's state in words a user can act on."""
    if job.pending:
        return "copy done, waiting to be finalized"
    if job.concluded:
        outcome = outcome_of(job)
        return f"ended ({outcome.result.value if outcome else job.status}), not yet collected"
    return f"{job.status} at {progress_text(job.offset, job.length)}"


def busy_message(disk: str, jobs: list[Progress], collect: Callable[[Progress], str]) -> str:
    """Why `disk` is busy: the jobs holding it; for ended ones, the one command that collects
    each (`collect(job)`), since such a job would otherwise hold the disk forever."""
    if not jobs:
        return f"disk {disk!r} is busy with another block job; try again once it has ended"
    parts = []
    for job in jobs:
        text = f"{job.job_type or 'block'} job {job.job_id} ({job_state(job)})"
        if job.ended:
            text += f"; it has ended and nobody collected it: {collect(job)}"
        parts.append(text)
    running = [job for job in jobs if not job.ended]
    tail = "; try again once it has ended" if running else ""
    return f"disk {disk!r} is held by " + "; ".join(parts) + tail
