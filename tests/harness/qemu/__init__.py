"""Tests for lxd_agent_harness.qemu."""
