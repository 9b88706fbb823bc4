"""Tests for lxd_agent_harness.host.launcher: under its filter, raising RLIMIT_MEMLOCK succeeds
and changes nothing; with the vsock stand-in, a vsock socket binds and listens, and
/dev/vhost-vsock opens (as /dev/null) and takes a guest CID, where this machine has none."""

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
            "lxd_agent_harness.host.launcher",
            "--memlock-noop",
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
        [sys.executable, "-m", "lxd_agent_harness.host.launcher", "--memlock-noop"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "usage:" in done.stderr


VSOCK_AND_DEVICE = """
import fcntl, os, socket, struct, sys
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((2, 12345))  # the host's CID: refused on a machine without vhost_vsock
s.listen(4)
fd = os.open("/dev/vhost-vsock", os.O_RDWR | os.O_CLOEXEC)
fcntl.ioctl(fd, 0x4008AF60, struct.pack("Q", 3))  # VHOST_VSOCK_SET_GUEST_CID
print(os.readlink(f"/proc/self/fd/{fd}"))
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:
    t.bind(("203.0.113.1", 1))  # not an address of this machine: still refused
except OSError as e:
    print(e.errno)
sys.exit(3)
"""


def test_the_vsock_stand_in_answers_the_daemons_vsock_calls_and_no_others() -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "lxd_agent_harness.host.launcher", "--vsock-stand-in",
            sys.executable, "-c", VSOCK_AND_DEVICE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    # /dev/null for the device, EADDRNOTAVAIL for the other bind, the command's exit status.
    assert (done.returncode, done.stdout.split()) == (3, ["/dev/null", "99"]), done.stderr
