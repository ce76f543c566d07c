"""The one exception tree of BlockPull.

Every error the engine, the CLI and the agent raise on purpose is a `BlockPullError`. A VM-side
error is either *transient* (waiting is not failing: the VM is not there yet, QEMU does not
answer, the disk is busy; try again later) or *permanent* (the request can never succeed as
written, or the job itself failed). Each carries the `reason` that the BlockPull status uses and
says whether a retry can help (`retryable`), so the edges map errors in one place each: the
agent's kopf handlers (`blockpull.agent.handlers.kopf_error`), its status (the runner waits on
transient ones, fails on permanent ones) and the CLI's exit statuses (`blockpull.cli`). The
Kubernetes API's own errors (`blockpull.agent.kube.KubeAPIError`) are a branch of their own:
retryable, but never mistaken for the VM waiting.
"""

from __future__ import annotations

from typing import ClassVar


class BlockPullError(Exception):
    """Root of every error BlockPull raises on purpose."""

    #: CamelCase reason used in conditions and Events.
    reason: ClassVar[str] = "Error"
    #: Trying the same thing again later may succeed.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransientError(BlockPullError):
    """The request may succeed later without any change to it: retry with backoff."""

    retryable = True


class PermanentError(BlockPullError):
    """Retrying the same request cannot help."""


# --- transient -----------------------------------------------------------------------------


class VMNotFound(TransientError):
    """The VM's QMP socket does not exist (yet)."""

    reason = "WaitingForVM"


class QEMUUnavailable(TransientError):
    """The socket exists but QEMU does not answer, refuses, or went away."""

    reason = "QEMUUnavailable"


class QMPTimeout(QEMUUnavailable):
    """A connect or a command did not complete within its bounded timeout."""


class Disconnected(QEMUUnavailable):
    """The QMP connection dropped (QEMU exited, was killed, or closed the monitor)."""


class DiskBusy(TransientError):
    """Another block job holds a node of the disk's chain."""

    reason = "DiskBusy"


class InspectionUnsafe(TransientError):
    """Listing block nodes now could crash QEMU 7.2 (a stream job may be concluding).

    QEMU 7.2 dies with SIGSEGV on `query-named-block-nodes` while a stream job is concluded and
    not yet dismissed. We never send it while a stream job could reach that state.
    """

    reason = "QEMUUnavailable"


# --- permanent -----------------------------------------------------------------------------


class InvalidSpec(PermanentError):
    """The request itself is malformed (bad name, bad bandwidth, bad template...)."""

    reason = "InvalidSpec"


class DiskNotFound(PermanentError):
    """QEMU has no disk by that name."""

    reason = "DiskNotFound"


class BaseNotInChain(PermanentError):
    """The requested base is not an image below the disk."""

    reason = "BaseNotInChain"


class JobFailed(PermanentError):
    """The block job ended with an error; the message is QEMU's own text."""

    reason = "IOError"


class JobNotFound(PermanentError):
    """QEMU has no job with that id."""

    reason = "JobNotFound"


class VMExited(PermanentError):
    """QEMU went away while the job ran and did not come back."""

    reason = "VMExited"


class DeadlineExceeded(PermanentError):
    """The job ran past its deadline and was cancelled."""

    reason = "DeadlineExceeded"


class Unsupported(PermanentError):
    """The hypervisor API cannot do this (libvirt has no block-job pause)."""

    reason = "Unsupported"


class CommandFailed(PermanentError):
    """QEMU rejected a command for a reason that has no more specific class."""

    reason = "QEMUError"

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        super().__init__(message)
        self.error_class = error_class


# --- libvirt -------------------------------------------------------------------------------


class HypervisorUnavailable(QEMUUnavailable):
    """libvirtd does not answer: its socket is missing, it refuses us, or the connection dropped
    and has not come back yet. The VM (and a running job) may be fine; try again later."""

    reason = "LibvirtUnavailable"
