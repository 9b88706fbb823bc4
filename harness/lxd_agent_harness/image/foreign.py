"""Run a command where another architecture's binaries run (an arm64 tree's maintainer scripts on
an amd64 host), without changing the host.

mmdebstrap builds a foreign tree by running its packages' scripts through qemu-user, which the
kernel starts through binfmt_misc (facts §12). `foreign_command(arch, command)` says how to run
`command` for a tree of `arch`:

- the host runs `arch` itself, or its binfmt_misc already has an interpreter for it (`arch-test`
  says so): `command` as it is;
- else, where the kernel gives each user namespace a binfmt_misc of its own (Linux 6.7 and
  later): this module as a launcher (`python -m lxd_agent_harness.image.foreign ARCH --
  COMMAND`). Its child enters a new user namespace (root as root, 65536 ids one to one, so
  files keep their owners) and a new mount namespace, mounts a binfmt_misc of its own, registers
  qemu-user-static's interpreter there (magic and mask from Debian's own
  /usr/lib/binfmt.d/qemu-CPU.conf, with flag F: the interpreter is opened now and serves inside
  the tree), and execs `command`. The host's binfmt_misc is neither mounted nor written: the
  registration lives and ends with the namespace. That is why this way is preferred over
  registering on the host;
- else: a `ForeignArchError` naming what to install or enable.

Host side only. It never builds anything itself; `image.rootfs` runs what it returns.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from lxd_agent_harness.base.arch import Arch, host_arch
from lxd_agent_harness.base.errors import ImageError

BINFMT_DIR = Path("/usr/lib/binfmt.d")
QEMU_USER_DIR = Path("/usr/bin")
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
# Enough ids for every user and group a Debian tree's packages create, one to one.
_ID_RANGE = 65536
PROBE_TIMEOUT = 60.0


class ForeignArchError(ImageError):
    """A tree of another architecture cannot be built here; `arch` is the one asked for."""

    def __init__(self, message: str, *, arch: str) -> None:
        super().__init__(message)
        self.arch = arch


def registration(arch: Arch, binfmt_dir: Path = BINFMT_DIR, qemu_dir: Path = QEMU_USER_DIR) -> str:
    """The binfmt_misc rule for `arch`: Debian's magic and mask, qemu-user-static, flag F."""
    conf = binfmt_dir / f"qemu-{arch.kernel_name}.conf"
    interpreter = qemu_dir / f"qemu-{arch.kernel_name}-static"
    try:
        rule = conf.read_text().strip()
    except OSError:
        rule = ""
    fields = rule.split(":")
    # :name:type:offset:magic:mask:interpreter:flags
    if len(fields) != 8 or fields[2] != "M" or not interpreter.is_file():
        raise ForeignArchError(
            f"looked for qemu-user-static's {conf} and {interpreter} and found no usable "
            f"binfmt rule; install Debian's qemu-user-static (`make setup` in a clone)",
            arch=arch.value,
        )
    fields[6], fields[7] = str(interpreter), "F"
    return ":".join(fields)


def launcher(arch: Arch) -> list[str]:
    """The command prefix that runs what follows it in a namespace that runs `arch`."""
    return [sys.executable, "-m", "lxd_agent_harness.image.foreign", arch.value, "--"]


@functools.lru_cache(maxsize=None)
def _runs(prefix: tuple[str, ...], arch: Arch) -> bool:
    try:
        done = subprocess.run(
            [*prefix, "arch-test", arch.value],
            capture_output=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def foreign_command(arch: Arch, command: Sequence[str]) -> tuple[list[str], str]:
    """`command` as it must run for a tree of `arch`, and how, in words (for the progress)."""
    if arch is host_arch():
        return list(command), f"{arch.value} is this host's own"
    if shutil.which("arch-test") is None:
        raise ForeignArchError(
            "arch-test is not on PATH; install Debian's arch-test (mmdebstrap uses it too)",
            arch=arch.value,
        )
    if _runs((), arch):
        return list(command), f"this host's binfmt_misc already runs {arch.value}"
    registration(arch)  # the rule must exist before the launcher tries it
    if _runs(tuple(launcher(arch)), arch):
        return [*launcher(arch), *command], (
            f"{arch.value} through qemu-user registered in a private binfmt_misc of a user "
            "namespace (the host's is left alone)"
        )
    raise ForeignArchError(
        f"this host cannot run {arch.value} binaries: its binfmt_misc has no interpreter for "
        f"{arch.kernel_name}, and its kernel gives user namespaces no binfmt_misc of their own "
        "(Linux 6.7 and later do); register qemu-user-static's on the host "
        f"(`update-binfmts --enable qemu-{arch.kernel_name}`) or use a newer kernel",
        arch=arch.value,
    )


# -- the launcher ----------------------------------------------------------------------------------


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare: {os.strerror(error)}")


def run_in_namespace(arch: Arch, command: Sequence[str]) -> int:
    """Fork a child into new user and mount namespaces that run `arch`; its exit status."""
    rule = registration(arch)
    ready_r, ready_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(ready_r)
            os.close(mapped_w)
            _unshare(_CLONE_NEWUSER | _CLONE_NEWNS)
            os.write(ready_w, b"1")
            if os.read(mapped_r, 1) != b"1":
                os._exit(125)
            os.setgid(0)
            os.setuid(0)
            binfmt = "/proc/sys/fs/binfmt_misc"
            subprocess.run(
                ["mount", "--make-rprivate", "/"], check=True, capture_output=True, timeout=30
            )
            subprocess.run(
                ["mount", "-t", "binfmt_misc", "binfmt_misc", binfmt],
                check=True,
                capture_output=True,
                timeout=30,
            )
            with open(f"{binfmt}/register", "w") as register:
                register.write(rule)
            os.execvp(command[0], list(command))
        except BaseException as e:  # a child reports and exits, always
            sys.stderr.write(f"lxd_agent_harness.image.foreign: {e}\n")
            os._exit(126)
    os.close(ready_w)
    os.close(mapped_r)
    try:
        if os.read(ready_r, 1) == b"1":
            # Root (in the host's namespace) maps its own ids one to one into the child's.
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{pid}/{name}", "w") as ids:
                    ids.write(f"0 0 {_ID_RANGE}\n")
            os.write(mapped_w, b"1")
    finally:
        os.close(mapped_w)
        os.close(ready_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m lxd_agent_harness.image.foreign ARCH -- COMMAND...\n")
        return 2
    try:
        return run_in_namespace(Arch(argv[0]), argv[2:])
    except (ValueError, OSError, ImageError) as e:
        sys.stderr.write(f"lxd_agent_harness.image.foreign: {e}\n")
        return 125


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
