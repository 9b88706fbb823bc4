"""Tests for lxd_agent_harness, one test module per module, in a tree that mirrors its layers."""
