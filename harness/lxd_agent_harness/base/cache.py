"""Where the harness keeps files between runs: one cache directory, and nothing anywhere else.

Images, emulation packages, saved guests for warm starts, the KVM probe's verdict and the
machine-wide VM lock all live under `cache_root()`. This module names the place, says which
entries of a kept kind are due to go, and serialises the building of one entry (`building`);
it creates and removes no entry itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from lxd_agent_harness.base.errors import HarnessError
from lxd_agent_harness.base.progress import Progress


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


# How often a run waiting for another's build looks again.
LOCK_POLL = 0.5


class CacheBusy(HarnessError):
    """Another process held a cache entry's lock for longer than we were willing to wait."""

    def __init__(self, lock: Path, waited: float) -> None:
        self.lock = lock
        self.waited = waited
        super().__init__(
            f"waited {waited:g} s for {lock} (another run is building the same cache entry); "
            f"stop it (`fuser -v {lock}` names it) or remove its build, then retry"
        )


@contextlib.contextmanager
def building(lock: Path, timeout: float, progress: Progress) -> Iterator[None]:
    """Hold `lock` (an flock on that file) while building one cache entry.

    Two runs that need the same entry (two pytest workers, a test run beside `make demo`) then
    build it once: the second waits, bounded by `timeout`, and finds it complete. The lock file
    stays (removing it would race with a waiter that just opened it); it is a few bytes.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    told = False
    with lock.open("a") as held:
        while True:
            try:
                fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > timeout:
                    raise CacheBusy(lock, round(waited)) from None
                if not told:
                    progress(f"waiting for another run building the same entry ({lock})")
                    told = True
                time.sleep(LOCK_POLL)
        yield  # closing the file releases the lock
