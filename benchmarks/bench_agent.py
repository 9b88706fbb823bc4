"""How lean the guest agent's start is: time from exec to READY=1, its memory, and its imports.

Prints figures and ratios against a bare interpreter; asserts nothing (these machines are
shared and noisy). Run: .venv/bin/python benchmarks/bench_agent.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import pty
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path

from lxd_agent.protocol import PORT_NAME


def _start_to_ready(tree: Path, notify_path: Path) -> tuple[float, int]:
    """Seconds from exec to READY=1, and the agent's peak RSS in KiB."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    began = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lxd_agent.guest",
            "run",
            "--refresh",
            "0",
            "--dev-root",
            str(tree / "dev" / "virtio-ports"),
            "--sys-root",
            str(tree / "sys"),
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.perf_counter() - began
        proc.terminate()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return ready, usage.ru_maxrss
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        sock.close()
        notify_path.unlink()


def _bare_interpreter() -> tuple[float, int]:
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return time.perf_counter() - began, usage.ru_maxrss


def _imported_modules() -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, lxd_agent.guest.commands; print(len(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    master, slave = pty.openpty()
    tty.setraw(slave)
    with tempfile.TemporaryDirectory() as top:
        tree = Path(top)
        (tree / "dev" / "virtio-ports").mkdir(parents=True)
        (tree / "sys").mkdir()
        (tree / "dev" / "virtio-ports" / PORT_NAME).symlink_to(os.ttyname(slave))
        agent = [_start_to_ready(tree, tree / "notify") for _ in range(runs)]
        os.close(master)
        os.close(slave)
    bare = [_bare_interpreter() for _ in range(runs)]
    agent_s = statistics.median(a for a, _ in agent)
    bare_s = statistics.median(b for b, _ in bare)
    agent_kib = max(m for _, m in agent)
    bare_kib = max(m for _, m in bare)
    print(f"runs: {runs}, python: {sys.version.split()[0]}")
    print(f"exec -> READY=1 (STARTED written): median {agent_s * 1000:.1f} ms")
    print(f"bare interpreter start:            median {bare_s * 1000:.1f} ms")
    print(f"ratio agent/bare start:            {agent_s / bare_s:.2f}")
    print(
        f"peak RSS agent: {agent_kib} KiB, bare: {bare_kib} KiB, ratio {agent_kib / bare_kib:.2f}"
    )
    print(f"modules loaded by the CLI import:  {_imported_modules()}")


if __name__ == "__main__":
    main()
