"""Where the harness's unix sockets go: the temporary directory, unless its path is too long.

A unix socket's path holds at most 107 bytes. QEMU's QMP and console sockets and a daemon's
socket live in directories the harness makes under the temporary directory; a long `TMPDIR`
(pytest's, xdist's, a CI's workspace) would leave them no room, and `bind` would fail with
"AF_UNIX path too long". Host side only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SOCKET_PATH_MAX = 107
"""An AF_UNIX socket path's bytes at most."""

SOCKET_ROOM = 40
"""What a directory made under the base, and a socket's name in it, may take."""


def socket_base() -> Path:
    """The temporary directory, or `/tmp` when its path leaves no room for a socket under it."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > SOCKET_PATH_MAX - SOCKET_ROOM:
        base = Path("/tmp")
    return base
