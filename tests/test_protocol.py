"""Tests for lxd_agent.protocol: the names and lines both sides take from it, as LXD's host reads
them (facts §1, §2)."""

from __future__ import annotations

from lxd_agent import protocol


def test_the_agent_tries_the_new_name_first_the_legacy_one_second_and_incus_last() -> None:
    assert protocol.CANDIDATE_PORT_NAMES == (
        "com.canonical.lxd",
        "org.linuxcontainers.lxd",
        "org.linuxcontainers.incus",
    )


def test_a_doubled_status_line_reads_as_itself_by_every_hosts_rule_and_fits_16_bytes() -> None:
    """Incus 7.3 takes the line before last of a read with several; LXD (and Incus before
    7.3) the last. A stale STARTED before one STOPPED would read as STARTED by the first."""
    assert protocol.LINES_PER_WRITE == {protocol.INCUS_PORT_NAME: 2}
    for line in protocol.STATUS_LINES:
        stale = "STARTED\n" if line == "STOPPED" else "STOPPED\n"
        entries = (stale + (line + "\n") * 2).split("\n")
        assert entries[len(entries) - 3] == line  # Incus 7.3 (more than two entries)
        assert entries[len(entries) - 2] == line  # LXD, Incus before 7.3
        assert len((line + "\n") * 2) <= protocol.DEFAULT_RING_SIZE


def test_the_status_lines_are_lxds_words_without_their_newline() -> None:
    assert protocol.STATUS_LINES == ("STARTED", "STOPPED")
    assert all("\n" not in line for line in (*protocol.STATUS_LINES, protocol.CONNECTED))


def test_the_ring_is_lxds_16_bytes_a_power_of_two_that_holds_one_status_line() -> None:
    size = protocol.DEFAULT_RING_SIZE
    assert size == 16 and size & (size - 1) == 0
    assert all(len(line) + 1 <= size for line in protocol.STATUS_LINES)
    assert protocol.DEFAULT_REFRESH_SECONDS == 5.0  # LXD's own agent's period
