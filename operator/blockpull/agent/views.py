"""What the status says at each step of a pull: pure functions from what is known to a view.

Owns: the words and numbers of every status the runner writes (pending, started, re-attached,
running or paused, completed, failed); `blockpull.agent.status` turns a view into the
`.status` with its conditions. No I/O here: everything is unit-testable as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from blockpull.agent import status as st
from blockpull.agent.record import PullRecord
from blockpull.driver import ChainImage, Outcome, Progress, StartedJob
from blockpull.quantity import format_bytes, progress_text

#: A spec generation the agent could not apply, and why (see `PullRunner.reject`).
Rejected = tuple[int, str] | None

# completionTime is when the agent learned the outcome: QEMU keeps no time for a concluded job.
UNWATCHED = "the job ended while the agent was not watching; completionTime is when it was seen"


def rejected_note(rejected: Rejected) -> str:
    return f"; spec generation {rejected[0]} not applied: {rejected[1]}" if rejected else ""


def rate(bandwidth: int) -> str:
    return "unlimited" if bandwidth == 0 else f"{format_bytes(bandwidth)}/s"


def percent(outcome: Outcome) -> str:
    return progress_text(outcome.offset, outcome.length)


def chain_entries(chain: Sequence[ChainImage]) -> list[dict[str, str]]:
    return [{"node": image.node, "file": image.filename} for image in chain]


#: The Pending reason of an object waiting for one of the node's slots (BLOCKPULL_MAX_CONCURRENT).
QUEUED = "Queued"


def queued_message(ahead: int, limit: int) -> str:
    """Its place when it was queued (not rewritten as the queue moves)."""
    return f"waiting for one of the node's {limit} job slots (BLOCKPULL_MAX_CONCURRENT); {ahead} ahead of it"


def pending(reason: str, message: str, rejected: Rejected = None) -> st.StatusView:
    return st.StatusView(phase=st.PENDING, reason=reason, message=message + rejected_note(rejected))


def started(job_id: str, disk: str, job: StartedJob, bandwidth: int, now: str) -> st.StatusView:
    return st.StatusView(
        phase=st.RUNNING,
        reason="Streaming",
        message=f"streaming {disk} from {len(job.released_images)} backing image(s)",
        job_id=job_id,
        target={"node": job.device, "base": job.base_node},
        chain=chain_entries(job.chain),
        # 0.00% at once (a blank PROGRESS column reads as "nothing known").
        offset=0,
        length=job.chain[0].virtual_size if job.chain else 0,
        bandwidth=bandwidth,
        start_time=now,
    )


def reattached(job_id: str, chain: Sequence[ChainImage], base: str | None, phase: str) -> st.StatusView:
    """Re-attached after a restart that came before the chain was recorded."""
    base_node = next((i.node for i in chain[1:] if base in (i.node, i.filename)), None)
    return st.StatusView(
        phase=phase,
        reason="Streaming",
        message="re-attached to the running job",
        job_id=job_id,
        chain=chain_entries(chain),
        target={"node": chain[0].node if chain else None, "base": base_node},
    )


def running(
    job_id: str, job: Progress, on_error: str, rejected: Rejected = None, *, pause_unsupported: bool = False
) -> st.StatusView:
    if job.paused:
        phase = st.PAUSED
        if job.io_status == "ok":
            reason, message = "Paused", "paused by spec.paused"
        else:
            reason = f"PausedOnError{job.io_status.capitalize()}"
            message = (
                f"QEMU paused the job after an I/O error (io-status {job.io_status}, onError "
                f"{on_error}); set paused true then false to retry"
            )
    else:
        phase, reason = st.RUNNING, "Streaming"
        message = f"streamed {format_bytes(job.offset)} of {format_bytes(job.length)}"
        if pause_unsupported:
            # The pause was asked for and cannot be done (libvirt): the reason says so.
            reason = "PauseUnsupported"
            message += "; spec.paused is true but the hypervisor API cannot pause a block job"
    return st.StatusView(
        phase=phase,
        reason=reason,
        message=message + rejected_note(rejected),
        job_id=job_id,
        offset=job.offset,
        length=job.length,
        bandwidth=job.speed,
    )


def completed(record: PullRecord, outcome: Outcome | None, note: str | None, now: str) -> st.StatusView:
    released = record.released()
    length = outcome.length if outcome else record.length
    # What was pulled, and how big the disk is: QEMU's length is the virtual size, not the
    # amount copied (a pull to a base may copy a few MiB of a 128 MiB disk).
    copied = f"{len(released)} backing image(s)" if released else "nothing (no backing file)"
    message = f"pulled the data of {copied} into the disk (virtual size {format_bytes(length)})"
    return st.StatusView(
        phase=st.COMPLETED,
        reason="Completed",
        message=f"{message}; {note}" if note else message,
        offset=outcome.offset if outcome else length,
        length=length,
        completion_time=now,
        released_images=released,
    )


def failed(reason: str, message: str, outcome: Outcome | None, now: str) -> st.StatusView:
    return st.StatusView(
        phase=st.FAILED,
        reason=reason,
        message=message,
        offset=outcome.offset if outcome else None,
        length=outcome.length if outcome else None,
        completion_time=now,
    )
