"""Run a daemon under a seccomp filter that gets it past this machine's limits (facts §13).

`python -m lxd_agent_harness.host.launcher [--memlock-noop] [--vsock-stand-in] -- COMMAND...`

`--memlock-noop`: LXD 5.0 starts QEMU through `forklimits`, which raises RLIMIT_MEMLOCK to
unlimited and fails when it cannot; raising a hard limit needs `CAP_SYS_RESOURCE`, which root
lacks on some machines. Under the filter, `setrlimit` and `prlimit64` setting RLIMIT_MEMLOCK
return 0 and change nothing; reading the limit and every other limit are untouched.

`--vsock-stand-in`: Incus listens on vsock as the host (CID 2) once it can run VMs, and opens
`/dev/vhost-vsock` and sets the guest's CID on it before each VM starts; a machine without
`vhost_vsock` (itself a VM) has neither, and Incus will not start. The filter hands those calls
to this process (seccomp user notification) and it answers them: a `bind` or `listen` of an
AF_VSOCK socket succeeds without doing anything (nothing can connect; the status ring does not
use vsock), opening `/dev/vhost-vsock` gives `/dev/null`, and the CID ioctl succeeds. Every
other call the filter sees is let through unchanged. The VM's vsock device is removed by the
caller (`raw.qemu.conf`). The command runs as this process's child; this process answers its
calls until it exits and exits with its status, so the caller reaps both.

Needs Debian's `python3-seccomp` (libseccomp's binding, untyped, not on PyPI). Host side only.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import resource
import select
import signal
import struct
import sys
from typing import Any

AF_VSOCK = 40
VHOST_DEVICE = b"/dev/vhost-vsock\0"
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60  # _IOW(VHOST_VIRTIO 0xAF, 0x60, __u64)
OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC  # how Go's os.OpenFile(O_RDWR) opens the device
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103  # _IOW('!', 3, struct seccomp_notif_addfd)
SECCOMP_ADDFD_FLAG_SEND = 1 << 1  # add the fd and answer the call with it (Linux 5.14)
USER_NOTIF_FLAG_CONTINUE = 1  # let the call run as asked (Linux 5.5)


def build_filter(memlock_noop: bool, vsock_stand_in: bool) -> Any:
    import seccomp  # type: ignore[import-not-found]  # Debian's python3-seccomp, untyped

    calls = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    if memlock_noop:
        memlock = resource.RLIMIT_MEMLOCK
        succeed = seccomp.ERRNO(0)  # the call returns 0 and does nothing
        calls.add_rule(succeed, "setrlimit", seccomp.Arg(0, seccomp.EQ, memlock))
        # prlimit64(pid, resource, new, old): only a call that sets (new != NULL).
        calls.add_rule(
            succeed, "prlimit64", seccomp.Arg(1, seccomp.EQ, memlock), seccomp.Arg(2, seccomp.NE, 0)
        )
    if vsock_stand_in:
        calls.add_rule(seccomp.NOTIFY, "bind")
        calls.add_rule(seccomp.NOTIFY, "listen")
        calls.add_rule(
            seccomp.NOTIFY, "ioctl", seccomp.Arg(1, seccomp.EQ, VHOST_VSOCK_SET_GUEST_CID)
        )
        calls.add_rule(seccomp.NOTIFY, "openat", seccomp.Arg(2, seccomp.EQ, OPEN_FLAGS))
    return calls


def _peek(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as memory:  # O_RDONLY: not a call the filter holds
        memory.seek(address)
        return memory.read(size)


class StandIn:
    """Answers the held calls of the filter `calls` (loaded in this process)."""

    def __init__(self, calls: Any, null: int) -> None:
        import seccomp

        self.seccomp = seccomp
        self.calls = calls
        self.null = null
        self.notify_fd = calls.get_notify_fd()
        self.vsock_sockets: set[tuple[int, int]] = set()

    def answer_one(self) -> None:
        seccomp = self.seccomp
        try:
            held = self.calls.receive_notify()
        except RuntimeError:  # libseccomp's error: the call was withdrawn before it was read
            return
        name = seccomp.resolve_syscall(seccomp.Arch.NATIVE, held.syscall).decode()
        args = held.syscall_args
        how = "continue"
        try:
            if name == "bind" and struct.unpack("H", _peek(held.pid, args[1], 2))[0] == AF_VSOCK:
                self.vsock_sockets.add((held.pid, args[0]))
                how = "succeed"
            elif (name == "listen" and (held.pid, args[0]) in self.vsock_sockets) or (
                name == "ioctl"  # only the CID ioctl is held
            ):
                how = "succeed"
            elif name == "openat" and _peek(held.pid, args[1], len(VHOST_DEVICE)) == VHOST_DEVICE:
                how = "null"
        except OSError:
            pass  # the caller is gone, or its memory is: let the call run as it would
        try:
            if how == "succeed":
                self.calls.respond_notify(seccomp.NotificationResponse(held, 0, 0, 0))
            elif how == "null":
                add = struct.pack(
                    "QIIII", held.id, SECCOMP_ADDFD_FLAG_SEND, self.null, 0, os.O_CLOEXEC
                )
                fcntl.ioctl(self.notify_fd, SECCOMP_IOCTL_NOTIF_ADDFD, add)
            else:
                response = seccomp.NotificationResponse(held, 0, 0, USER_NOTIF_FLAG_CONTINUE)
                self.calls.respond_notify(response)
        except RuntimeError:
            pass  # libseccomp's error (ECANCELED, ENOENT): the caller was interrupted or killed
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ECANCELED):  # as above, from the ioctl
                raise

    def serve(self, child: int) -> int:
        """Answer until `child` exits; its exit status (as a shell gives it)."""
        while True:
            ready, _, _ = select.select([self.notify_fd], [], [], 0.5)
            if ready:
                self.answer_one()
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status) % 256


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lxd_agent_harness.host.launcher")
    parser.add_argument("--memlock-noop", action="store_true")
    parser.add_argument("--vsock-stand-in", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("a command to run is needed")
    # Opened before the filter is loaded: with the stand-in, this open would be held.
    null = os.open("/dev/null", os.O_RDWR)
    calls = build_filter(args.memlock_noop, args.vsock_stand_in)
    calls.load()
    if not args.vsock_stand_in:
        os.execvp(args.command[0], args.command)
    stand_in = StandIn(calls, null)
    child = os.fork()
    if child == 0:
        os.execvp(args.command[0], args.command)
    # A signal to this process (the caller stopping the daemon) is the daemon's.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _frame: os.kill(child, s))
    return stand_in.serve(child)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
