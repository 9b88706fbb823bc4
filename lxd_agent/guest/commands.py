"""The ``lxd-agent`` commands: ``run`` (the daemon), ``probe``, ``status write`` and ``state``.

Runs in the guest, loaded by the entry point (``lxd_agent.guest.cli``) once the stop signals
are blocked. Bad options and values get one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
import time
from typing import Callable, NoReturn, Sequence

from lxd_agent import __version__
from lxd_agent.guest import agent
from lxd_agent.guest.agent import (
    DEFAULT_WAIT_SECONDS,
    EXIT_NO_PORT,
    STATE_LINE_CHOICES,
    AgentConfig,
    describe_port,
)
from lxd_agent.guest.notify import LEVELS
from lxd_agent.guest.ports import (
    DEV_ROOT,
    SYS_ROOT,
    PortError,
    PortRoots,
    describe_all,
    find_connected_port,
    survey,
    write_line,
)
from lxd_agent.protocol import DEFAULT_REFRESH_SECONDS, STATE_PORT_NAMES, STATUS_LINES

PROG = "lxd-agent"
EXIT_USAGE = 2
EXIT_PROBE_BROKEN = 255

_LOG_LEVELS = tuple(LEVELS)
NO_PORT_CHOICES = ("wait", "skip")

# Every duration option is bounded. Under 0.1 s the agent would spin (the host sees a line
# at most once a second anyway); over a day is a typo, and near 1e10 s the kernel's timeouts
# overflow (a crash after STARTED, and STOPPED never written).
MIN_SECONDS = 0.1
MAX_SECONDS = 86400.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _seconds(zero_means: str | None = None) -> Callable[[str], float]:
    """An argparse type for a duration in [MIN_SECONDS, MAX_SECONDS], or 0 if ``zero_means``."""
    allowed = f"{MIN_SECONDS:g} to {MAX_SECONDS:g} seconds"
    if zero_means is not None:
        allowed = f"0 ({zero_means}) or {allowed}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        # NaN fails every comparison, so it lands in the error with inf and the rest.
        if zero_means is not None and value == 0:
            return 0.0
        if MIN_SECONDS <= value <= MAX_SECONDS:
            return value
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")

    return parse


def _directory(text: str) -> str:
    try:
        is_directory = stat.S_ISDIR(os.stat(text).st_mode)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text!r} does not exist") from None
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e.strerror}") from None
    if not is_directory:
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def _add_roots(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dev-root",
        type=_directory,
        metavar="DIR",
        help=f"where udev links ports by name (default: {DEV_ROOT})",
    )
    parser.add_argument(
        "--sys-root",
        type=_directory,
        metavar="DIR",
        help="sysfs class directory of the ports, used when a link is missing "
        f"(default: {SYS_ROOT}); device nodes are looked for in the parent of "
        "--dev-root",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Report this VM's agent status (STARTED/STOPPED) to the LXD host "
        "through the virtio-serial port com.canonical.lxd, or the legacy "
        "org.linuxcontainers.lxd.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="run the agent (what the systemd unit starts)")
    run.add_argument(
        "--refresh",
        type=_seconds(zero_means="write it once"),
        default=DEFAULT_REFRESH_SECONDS,
        metavar="SECONDS",
        help="rewrite STARTED this often, since the host's reads consume it; 0 writes it "
        "once (default: %(default)g)",
    )
    run.add_argument(
        "--wait",
        type=_seconds(zero_means="look once"),
        default=DEFAULT_WAIT_SECONDS,
        metavar="SECONDS",
        help="how long to wait at start for a usable port (default: %(default)g)",
    )
    run.add_argument(
        "--if-no-port",
        choices=NO_PORT_CHOICES,
        default="wait",
        help="no usable port at the first look: wait for one (--wait, then exit 1), or skip: "
        "tell systemd READY=1 with the reason in STATUS= and exit 0, which is what the unit "
        "does where the only LXD port has nothing behind it (default: %(default)s)",
    )
    run.add_argument(
        "--state-line",
        choices=STATE_LINE_CHOICES,
        default="auto",
        help="follow STARTED on " + ", ".join(STATE_PORT_NAMES) + " with a JSON line of this "
        "guest's state, which Incus 7.3 and later show (see 'lxd-agent state'); auto: when the "
        "lxd-agent.state credential or /etc/lxd-agent/state says on (default: %(default)s)",
    )
    run.add_argument(
        "--log-level", choices=_LOG_LEVELS, default="info", help="(default: %(default)s)"
    )
    _add_roots(run)

    probe = commands.add_parser("probe", help="show each candidate port and which one is usable")
    _add_roots(probe)

    status = commands.add_parser("status", help="write one status line and exit")
    status_commands = status.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    write = status_commands.add_parser(
        "write", help="write STARTED or STOPPED (the unit's stop hook writes STOPPED)"
    )
    write.add_argument("state", choices=STATUS_LINES, metavar="{" + ",".join(STATUS_LINES) + "}")
    write.add_argument(
        "--timeout",
        type=_seconds(),
        default=2.0,
        metavar="SECONDS",
        help="give up after this long in all (default: %(default)g)",
    )
    _add_roots(write)

    commands.add_parser(
        "state",
        help="print the state line the agent would write after STARTED on Incus's port, and "
        "whether it is switched on",
    )
    return parser


def _roots(args: argparse.Namespace) -> PortRoots:
    # Checked only when given: the default directories may not exist until a port appears.
    # Device nodes live beside the udev links' directory (/dev/virtio-ports -> /dev).
    dev_root = os.path.normpath(args.dev_root or DEV_ROOT)
    return PortRoots(dev_root, args.sys_root or SYS_ROOT, os.path.dirname(dev_root))


def run_config(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        refresh=args.refresh,
        wait=args.wait,
        roots=_roots(args),
        skip_without_port=args.if_no_port == "skip",
        state_line=args.state_line,
    )


def cmd_run(args: argparse.Namespace) -> int:
    return agent.run(run_config(args), LEVELS[args.log_level])


def cmd_probe(args: argparse.Namespace) -> int:
    candidates = survey(roots=_roots(args))
    name_width = max(len(c.name) for c in candidates)
    device_width = max(len(c.device or "-") for c in candidates)
    for c in candidates:
        print(
            "{:<{nw}}  {:<{dw}}  char-device={:<3}  host-connected={:<3}  {}".format(
                c.name,
                c.device or "-",
                "yes" if c.is_char_device else "no",
                "yes" if c.connected else "no",
                "usable" if c.usable else c.problem,
                nw=name_width,
                dw=device_width,
            )
        )
    chosen = next((c for c in candidates if c.usable), None)
    if chosen is None:
        print("would use: none (no usable port)")
        return EXIT_NO_PORT
    print("would use: " + describe_port(chosen))
    return 0


def cmd_status_write(args: argparse.Namespace) -> int:
    # As an ExecStopPost= after an ExecCondition= skip (the unit of 0.2.0 had one, a drop-in
    # may): that agent never said STARTED.
    if os.environ.get("SERVICE_RESULT") == "exec-condition":
        return 0
    deadline = time.monotonic() + args.timeout
    port, seen = find_connected_port(roots=_roots(args), deadline=deadline)
    if port is None or port.device is None:
        print(f"{PROG}: no usable port for {args.state}: {describe_all(seen)}", file=sys.stderr)
        return EXIT_NO_PORT
    try:
        write_line(port.device, args.state, max(deadline - time.monotonic(), 0.0), port.copies)
    except PortError as e:
        print(f"{PROG}: could not write {args.state}: {e}", file=sys.stderr)
        return EXIT_NO_PORT
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    from lxd_agent.guest.state import guest_state, state_line, state_switch

    _on, why = state_switch(credentials_directory=os.environ.get("CREDENTIALS_DIRECTORY"))
    print(f"state line: {why}", file=sys.stderr)
    print(state_line(guest_state()))
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked; bad input exits here with one line and status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or (args.command == "status" and args.action is None):
        parser.error("missing " + ("COMMAND" if args.command is None else "ACTION"))
    return args


def run_command(args: argparse.Namespace) -> int:
    if args.command == "run":
        return cmd_run(args)
    if args.command == "probe":
        try:
            return cmd_probe(args)
        except Exception as e:
            # probe is the unit's ExecCondition=, where 1 means "skip": a bug must fail it (255).
            print(f"{PROG}: probe failed: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_PROBE_BROKEN
    if args.command == "state":
        return cmd_state(args)
    return cmd_status_write(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The commands without the entry point's signal set-up: for tests and other callers."""
    return run_command(parse_args(argv))
