"""Text files the harness writes for people (the matrix's table, the README): whole or not at all.

Host side only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from lxd_agent_harness.base.errors import HarnessError


class TextFileError(HarnessError):
    """A file given on the command line could not be read."""


def read_text(path: Path) -> str:
    """The file's text; a `TextFileError` naming the file and why it could not be read."""
    try:
        return path.read_text()
    except OSError as e:
        raise TextFileError(f"cannot read {path}: {e.strerror}") from None


def write_whole(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it: the old or the new, never half.

    The file keeps its mode (a new one gets the umask's); the data is on disk before the rename.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
