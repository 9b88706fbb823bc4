"""Run a command whose raising of RLIMIT_MEMLOCK succeeds without doing anything.

LXD 5.0.2 starts QEMU through `lxd forklimits limit=memlock:unlimited:unlimited`, which raises
the memlock limit and fails when it cannot ("operation not permitted"). Raising a hard limit
needs `CAP_SYS_RESOURCE`, which root lacks on some machines (a container or a VM sandbox: facts
§13). Used only where `probes.memlock_raisable()` says so, this runs the daemon under a seccomp
filter (inherited by everything it starts) under which `setrlimit` and `prlimit64` setting
RLIMIT_MEMLOCK return 0 and change nothing; every other call, and every read of the limit, is
untouched. QEMU then runs with the limit it has, which TCG guests do not need raised.

`python -m lxd_agent_harness.host.memlock COMMAND [ARG...]`: it execs COMMAND under the filter.
Needs Debian's `python3-seccomp` (libseccomp's binding). Host side only.
"""

from __future__ import annotations

import os
import resource
import sys


def install_filter() -> None:
    """Make setting RLIMIT_MEMLOCK a no-op that succeeds, for this process and its children."""
    import seccomp  # type: ignore[import-not-found]  # Debian's python3-seccomp, untyped

    memlock = resource.RLIMIT_MEMLOCK
    allowed = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    succeed = seccomp.ERRNO(0)  # the call returns 0 and does nothing
    allowed.add_rule(succeed, "setrlimit", seccomp.Arg(0, seccomp.EQ, memlock))
    # prlimit64(pid, resource, new, old): only a call that sets (new != NULL) is a no-op.
    allowed.add_rule(
        succeed,
        "prlimit64",
        seccomp.Arg(1, seccomp.EQ, memlock),
        seccomp.Arg(2, seccomp.NE, 0),
    )
    allowed.load()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m lxd_agent_harness.host.memlock COMMAND [ARG...]", file=sys.stderr)
        return 2
    install_filter()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
