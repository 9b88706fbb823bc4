"""Build steps and build directories, for the image builders (`image.rootfs`, `image.cloud`).

A build step is a child process (mmdebstrap, mke2fs...) run in its own session, its output
passed on line by line, stopped with its whole process group on any exit. A build directory is
made next to the cache it publishes into and removed on every exit path, after detaching what
mmdebstrap may have left mounted in it: never deleted through a mount. Host side only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

from lxd_agent_harness.base.errors import BuildStepFailed, ImageError
from lxd_agent_harness.base.progress import Progress

STEP_STOP_TIMEOUT = 30.0


def stop_process_group(proc: subprocess.Popen[str], timeout: float = STEP_STOP_TIMEOUT) -> None:
    """End a build step started in its own session and everything it started (apt, dpkg)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    # What it left behind in its group (or all of it, if it did not end in time).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_build_step(
    command: Sequence[str],
    progress: Progress,
    what: str,
    stdin: IO[str] | None = None,
    tmpdir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a build step, pass its output lines to `progress`, keep the tail for the error.

    The step runs in its own session, so that an interrupt of the harness (any exception out of
    here) ends the step and every process it started, never leaving apt running on a tree that
    is about to be removed. `tmpdir`: the step's TMPDIR (in the build directory, so that what
    a step ended half-way leaves there, such as mmdebstrap's `mmdebstrap.gpghome.*`, goes with
    that directory). `env`: the step's whole environment, in place of the harness's.
    """
    step_env = None if env is None else dict(env)
    if tmpdir is not None:
        tmpdir.mkdir(exist_ok=True)
        step_env = {**(os.environ if env is None else env), "TMPDIR": str(tmpdir)}
    tail: list[str] = []
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        text=True,
        errors="replace",
        start_new_session=True,
        env=step_env,
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    progress(f"  {line}")
                    tail = [*tail[-19:], line]
            proc.wait()
        finally:
            stop_process_group(proc)
    if proc.returncode != 0:
        raise BuildStepFailed(what, command, proc.returncode, tail)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (mmdebstrap bind-mounts /dev, /sys and /proc there)."""
    prefix = os.path.realpath(path)
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) < 5:
                continue
            # mountinfo escapes space, tab, newline and backslash as octal (\040).
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """Delete a build directory, but never through a mount: that would delete the host's files."""
    if not os.path.lexists(path):
        return
    mounts = mounts_under(path)
    if mounts:
        raise ImageError(
            f"left {path} in place: {len(mounts)} file systems are still mounted under it "
            f"(first: {mounts[0]}), probably from an interrupted mmdebstrap; "
            f"run `umount -R {mounts[0]}` and delete the directory by hand"
        )
    shutil.rmtree(path, ignore_errors=True)


def detach_mounts_under(path: Path) -> None:
    """Detach what a failed or interrupted mmdebstrap left mounted inside our build directory.

    mmdebstrap bind-mounts the host's /dev, /proc and /sys, and local .debs, into its tree, and
    does not always undo that when it fails. Each mount is first made private, so that detaching
    it cannot propagate to the host's own mount of the same file system, then detached lazily,
    deepest first. Only mount points inside `path` are touched.
    """
    points = sorted(mounts_under(path), key=len, reverse=True)
    for command in (["mount", "--make-private"], ["umount", "--lazy"]):
        for point in points:
            subprocess.run([*command, point], check=False, capture_output=True, timeout=60)


@contextlib.contextmanager
def build_directory(images: Path, key: str, progress: Progress) -> Iterator[Path]:
    """A fresh `.build-<key>-*` directory in `images`, gone afterwards on every exit path.

    What mmdebstrap left mounted in it is detached first. When the build already failed, a
    failure to remove it is only reported, so that the build's own error stays the one raised.
    (Not TemporaryDirectory: its cleanup would delete through any mount left in the tree.)
    """
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=images))

    def clean() -> None:
        detach_mounts_under(work)
        remove_tree(work)

    try:
        yield work
    except BaseException:
        try:
            clean()
        except ImageError as e:
            progress(f"image: {e}")
        raise
    clean()
