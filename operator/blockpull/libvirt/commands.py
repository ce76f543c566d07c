"""The libvirt calls that start and steer a block job, and what their refusals mean.

Owns: starting a pull of everything (`virDomainBlockPull`) or down to a base
(`virDomainBlockRebase`, keeping a relative backing name relative when libvirt allows it),
setting a job's speed, and mapping libvirt's error codes on these calls onto BlockPull's
errors: a busy disk, a disk or base libvirt refuses, no job on the disk. What libvirt says
for anything else stays a `CommandFailed` carrying its code.
"""

from __future__ import annotations

import libvirt
from blockpull.driver import ChainImage
from blockpull.errors import BaseNotInChain, CommandFailed, DiskBusy, DiskNotFound, JobNotFound
from blockpull.libvirt.connection import ERR_AGAIN, ERR_INVALID_ARG, ERR_OPERATION_INVALID
from blockpull.libvirt.domainview import DomainView


def begin(view: DomainView, target: str, base: ChainImage | None, bandwidth: int) -> None:
    """Start the job on `target`: everything above `base` (None: the whole chain) into it."""
    try:
        if base is None:
            view.call(lambda d: d.blockPull(target, bandwidth, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES))
            return
        flags = libvirt.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES
        try:
            # Keep a relative backing name relative (QEMU writes an absolute one otherwise).
            view.call(
                lambda d: d.blockRebase(
                    target, base.node, bandwidth, flags | libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE
                )
            )
        except CommandFailed as exc:
            if exc.error_class != str(ERR_OPERATION_INVALID) or "relative" not in exc.message:
                raise
            # The chain down to the base is not relative: libvirt refuses RELATIVE then.
            view.call(lambda d: d.blockRebase(target, base.node, bandwidth, flags))
    except CommandFailed as exc:
        raise start_error(exc, view.describe, target, base) from exc


def start_error(exc: CommandFailed, describe: str, target: str, base: ChainImage | None) -> Exception:
    """What libvirt's refusal to start a job on `target` of `describe` means."""
    if exc.error_class == str(ERR_AGAIN):
        return DiskBusy(f"disk {target!r} of {describe} is busy: {exc.message}")
    if exc.error_class == str(ERR_INVALID_ARG):
        if base is not None and ("image" in exc.message or "index" in exc.message):
            return BaseNotInChain(f"libvirt refused base {base.node} ({base.filename}): {exc.message}")
        if "disk" in exc.message:
            return DiskNotFound(f"libvirt refused disk {target!r}: {exc.message}")
    return exc


def set_speed(view: DomainView, target: str, job_id: str, bytes_per_second: int) -> None:
    """The bandwidth of `target`'s job (`job_id` names it in errors)."""
    try:
        view.call(
            lambda d: d.blockJobSetSpeed(
                target, bytes_per_second, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES
            )
        )
    except CommandFailed as exc:
        raise no_job(exc, view.describe, job_id) from exc


def no_job(exc: CommandFailed, describe: str, job_id: str) -> Exception:
    """`JobNotFound` when libvirt refused a call on job `job_id` because the disk has none."""
    if exc.error_class == str(ERR_INVALID_ARG) and "active block job" in exc.message:
        return JobNotFound(f"no block job {job_id!r} on {describe}: {exc.message}")
    return exc
