"""Tests for lxd_agent_harness.cli."""
