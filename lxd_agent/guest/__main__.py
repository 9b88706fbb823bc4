"""``python3 -m lxd_agent.guest``: the same as the ``lxd-agent`` command.

Like /usr/bin/lxd-agent (``packaging/lxd-agent``), it holds the stop signals before it imports
anything of ours, for the reason ``lxd_agent.guest.cli`` gives; ``cli.main`` holds them again,
which changes nothing. Only ``python -m``'s own imports of the two packages come first.
"""

import _signal  # type: ignore[import-not-found]

_HELD = {_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP}
try:
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _HELD)
except KeyboardInterrupt:
    # A SIGINT just before the mask, run by pthread_sigmask once the mask is set. Send it again,
    # held now, as if it had come just after. (Blocked again for 3.8, which may take it before.)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _HELD)
    _signal.raise_signal(_signal.SIGINT)

import sys  # noqa: E402

from lxd_agent.guest.cli import main  # noqa: E402

sys.exit(main())
