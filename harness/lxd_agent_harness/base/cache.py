"""Where the harness keeps files between runs: one cache directory, and nothing anywhere else.

Images, emulation packages, the KVM probe's verdict and the machine-wide VM lock all live under
`cache_root()`. This module only names the place; it creates and removes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/lxd-agent`, the harness's only place for kept files."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lxd-agent"
