"""Tests for lxd_agent.protocol: the names and lines both sides take from it, as LXD's host reads
them (facts §1, §2)."""

from __future__ import annotations

from lxd_agent import protocol


def test_the_agent_tries_the_new_name_first_and_the_legacy_one_second() -> None:
    assert protocol.CANDIDATE_PORT_NAMES == ("com.canonical.lxd", "org.linuxcontainers.lxd")
    assert protocol.INCUS_PORT_NAME not in protocol.CANDIDATE_PORT_NAMES


def test_the_status_lines_are_lxds_words_without_their_newline() -> None:
    assert protocol.STATUS_LINES == ("STARTED", "STOPPED")
    assert all("\n" not in line for line in (*protocol.STATUS_LINES, protocol.CONNECTED))


def test_the_ring_is_lxds_16_bytes_a_power_of_two_that_holds_one_status_line() -> None:
    size = protocol.DEFAULT_RING_SIZE
    assert size == 16 and size & (size - 1) == 0
    assert all(len(line) + 1 <= size for line in protocol.STATUS_LINES)
    assert protocol.DEFAULT_REFRESH_SECONDS == 5.0  # LXD's own agent's period
