"""The agent and its package proven in real guests booted by the harness."""
