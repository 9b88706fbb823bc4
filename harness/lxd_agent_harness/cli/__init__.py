"""The `lxd-agent-harness` command: its options, its reports, interrupts and exit codes."""
