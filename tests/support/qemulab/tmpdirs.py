"""Short temporary directories for UNIX sockets.

A UNIX socket path holds at most 107 bytes; pytest's `tmp_path` is often longer. Sockets go
under `/tmp/bpl-XXXXXXXX/` instead, whatever TMPDIR says.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

#: Longest usable UNIX socket path (sun_path is 108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107

#: Where the short directories go.
SHORT_ROOT = Path("/tmp")


def short_tmpdir(prefix: str = "bpl-") -> Path:
    """A new empty directory with a short path (mode 0700); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=SHORT_ROOT))


def check_socket_path(path: Path) -> Path:
    """`path`, or `ValueError` if it is too long to bind a UNIX socket to."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path longer than {MAX_SOCKET_PATH} bytes: {path}")
    return path


def remove_tree(path: Path) -> None:
    """Remove a directory tree, ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)
