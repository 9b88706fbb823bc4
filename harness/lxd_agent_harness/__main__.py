"""``python3 -m lxd_agent_harness``: the same as the ``lxd-agent-harness`` command."""

import sys

from lxd_agent_harness.cli.main import main

sys.exit(main())
