#!/usr/bin/python3
"""An emulation of the status part of LXD's own guest agent, for the compatibility matrix.

Not LXD's code and not our agent: a small program the project wrote to behave, on the status
port, the way LXD's Go agent does (`lxd-agent/main_agent.go`, `startStatusNotifier` and
`writeStatus`, read at the tags lxd-5.0.2 and lxd-5.21.0), so the matrix can show what LXD's
agents do in each QEMU layout without LXD's config drive, vsock or TLS. What it copies, in
LXD's order:

1. The first `STARTED` is written before readiness, synchronously: if that write blocks, the
   agent never gets to step 2.
2. `READY=1` goes out by running `systemd-notify` (only under systemd, `NOTIFY_SOCKET`); if
   that fails, `STOPPED` is written and the agent exits 1.
3. Only then is SIGTERM taken; before, it kills the process (Go's default).
4. `STARTED` again every 5 s; on SIGTERM, `STOPPED`, and the agent waits for that write to
   end before it exits (a write that never ends holds the process until systemd kills it).

Every write is `writeStatus`: if the one fixed path exists, open it blocking (`O_RDWR`),
write one line, close it, and ignore every error; if it does not exist, do nothing. What LXD
does before step 1 (templates, vsock listener, TLS files from the config drive) and the
`CONNECTED` line (written once the host talks to it over vsock) are not emulated.

Usage: emulated_lxd_agent.py PORT_PATH (`/dev/virtio-ports/org.linuxcontainers.lxd` for LXD
5.0, `/dev/virtio-ports/com.canonical.lxd` for LXD 5.20 and later).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

REFRESH_SECONDS = 5.0  # main_agent.go: time.NewTicker(time.Second * 5)


def write_status(path: str, status: str) -> None:
    """LXD's `writeStatus`: one blocking open-write-close of the fixed path, errors ignored."""
    if not os.path.exists(path):
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        os.write(fd, (status + "\n").encode())
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def notify_ready() -> bool:
    """LXD's `shared.RunCommand("systemd-notify", "READY=1")`, only under systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return True
    try:
        return subprocess.run(["systemd-notify", "READY=1"], check=False).returncode == 0
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} PORT_PATH", file=sys.stderr)
        return 2
    path = argv[1]
    write_status(path, "STARTED")
    if not notify_ready():
        write_status(path, "STOPPED")
        print("Failed to notify systemd of readiness", file=sys.stderr)
        return 1
    # From here SIGTERM is taken, not fatal: blocked, and waited for between writes, so a write
    # stuck in the kernel goes on until it ends, as LXD's shutdown waits for its writer goroutine.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    while signal.sigtimedwait({signal.SIGTERM}, REFRESH_SECONDS) is None:
        write_status(path, "STARTED")
    write_status(path, "STOPPED")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
