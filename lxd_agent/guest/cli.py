"""The ``lxd-agent`` command's entry point: block the stop signals, then load the commands.

Runs in the guest, at the start of the process. A SIGTERM, SIGINT or SIGHUP that arrives
while the rest is loading would kill the agent without STOPPED or print a KeyboardInterrupt
traceback, so the signals are blocked before anything else is imported: this module must
import nothing that is not already loaded at start. The launcher (/usr/bin/lxd-agent) and
``python -m lxd_agent.guest`` hold them earlier still, before they import this module; ``main``
holding them again changes nothing and covers a console script that pip generates.

The unit's own command line (``UNIT_RUN``) runs at every boot and goes straight to the daemon:
argparse and what it loads (``re``, ``gettext``) cost more than the rest of the start. Every
other command line, including ``run`` with options, goes through the full parser in
``commands``, which gives the same configuration for ``UNIT_RUN`` (tests check it).
"""

# The C half of ``signal``, loaded with the interpreter: ``import signal`` would first load
# enum and functools, some 4 ms of a bare start with the signals still open.
import _signal  # type: ignore[import-not-found]
import sys

_SIGNALS = {_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP}

# What systemd/lxd-agent.service runs, word for word after the command's name.
UNIT_RUN = ["run", "--if-no-port=skip"]


def main() -> int:
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _SIGNALS)
    # Only now: everything below loads with the signals held back.
    if sys.argv[1:] == UNIT_RUN:
        from lxd_agent.guest import agent

        return agent.run(agent.AgentConfig(skip_without_port=True))

    from lxd_agent.guest import commands

    args = commands.parse_args(sys.argv[1:])
    if args.command != "run":
        # run takes its signals synchronously (sigtimedwait) and writes STOPPED; the
        # one-shot commands keep the default actions, so a signal ends them quietly at once.
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, _SIGNALS)
    return commands.run_command(args)
