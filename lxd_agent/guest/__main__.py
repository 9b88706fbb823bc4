"""``python3 -m lxd_agent.guest``: the same as the ``lxd-agent`` command."""

import sys

from lxd_agent.guest.cli import main

sys.exit(main())
