"""Tests for lxd_agent_harness.host.memlock: under the filter, raising RLIMIT_MEMLOCK succeeds
and changes nothing; reading it and other limits are untouched."""

from __future__ import annotations

import subprocess
import sys

RAISE_AND_READ = """
import resource as r
before = r.getrlimit(r.RLIMIT_MEMLOCK)
r.setrlimit(r.RLIMIT_MEMLOCK, (r.RLIM_INFINITY, r.RLIM_INFINITY))
r.prlimit(0, r.RLIMIT_MEMLOCK, (r.RLIM_INFINITY, r.RLIM_INFINITY))
assert r.getrlimit(r.RLIMIT_MEMLOCK) == before, "the limit changed"
soft, hard = r.getrlimit(r.RLIMIT_NOFILE)
r.setrlimit(r.RLIMIT_NOFILE, (soft - 1, hard))
assert r.getrlimit(r.RLIMIT_NOFILE) == (soft - 1, hard), "another limit was not set"
print("ok")
"""


def test_raising_memlock_succeeds_as_a_no_op_and_other_limits_still_change() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lxd_agent_harness.host.memlock",
            sys.executable,
            "-c",
            RAISE_AND_READ,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_no_command_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lxd_agent_harness.host.memlock"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "usage:" in done.stderr
