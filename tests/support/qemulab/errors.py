"""Exceptions raised by the lab.

Everything the lab raises on purpose is a `LabError`, so a test can tell "the lab broke" from
"the code under test broke".
"""

from __future__ import annotations

from collections.abc import Sequence


class LabError(Exception):
    """Root of every error the lab raises on purpose."""


class ToolError(LabError):
    """A QEMU command-line tool (`qemu-img`, `qemu-io`, ...) failed or timed out."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exited {returncode}"
        text = stderr.strip()
        if len(text) > 2000:
            text = text[:2000] + " [...]"
        super().__init__(f"{' '.join(self.argv)} {what}: {text}")


class ImageCorrupt(LabError):
    """`qemu-img check` found corruption (leaked clusters alone are not corruption)."""


class VMStartError(LabError):
    """QEMU exited or did not answer on its monitor before the readiness deadline."""


class VMError(LabError):
    """A running QEMU process could not be controlled as asked."""
