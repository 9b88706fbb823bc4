"""Where the harness keeps files between runs: one cache directory, and nothing anywhere else.

Images, emulation packages, saved guests for warm starts, the KVM probe's verdict and the
machine-wide VM lock all live under `cache_root()`. This module names the place and says which
entries of a kept kind are due to go; it creates and removes nothing itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/lxd-agent`, the harness's only place for kept files."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lxd-agent"


def least_recently_used(
    directory: Path, keep: int, is_complete: Callable[[Path], bool]
) -> list[Path]:
    """The complete entries of `directory` beyond the `keep` most recently used (by mtime; a
    user touches its entry's directory), for the caller to remove. Entries whose names start
    with a dot (builds in progress) are never among them."""
    complete = [d for d in directory.iterdir() if not d.name.startswith(".") and is_complete(d)]
    complete.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    return complete[keep:]
