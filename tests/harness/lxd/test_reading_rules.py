"""Tests for lxd_agent_harness.lxd.reading_rules: how LXD's and Incus's hosts read a ring (a table
of cases), checked against the pure functions and against the utf8 reply of a real QEMU."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lxd_agent.protocol import CONNECTED, STARTED, STOPPED
from lxd_agent_harness.base.aio import bounded
from lxd_agent_harness.lxd.layouts import INCUS_RING_SIZE, ReadingRule
from lxd_agent_harness.lxd.reading_rules import (
    RingRead,
    interpret_ring_read,
    interpret_ring_text,
    qemu_utf8_text,
)
from lxd_agent_harness.qemu.process import QemuProcess
from tests.helpers import TEST_DEADLINE, ring_qemu, run, write_ring

# Each host's ring size: a case's `written` bytes go into a ring this big.
INCUS = ReadingRule.INCUS
RING_SIZES = {ReadingRule.LXD: 16, ReadingRule.INCUS: INCUS_RING_SIZE}


@dataclass(frozen=True)
class Case:
    id: str
    written: bytes  # what the guest wrote, in total, since the last read
    line: str | None  # the line the host takes its status from
    status: str | None  # the state it sets; None: unchanged
    rule: ReadingRule = ReadingRule.LXD
    state: dict[str, object] | None = None  # Incus 7.3: the instance state the read sets

    @property
    def reading(self) -> RingRead:
        sets_state = self.rule is INCUS and self.line is not None
        return RingRead(self.line, self.status, sets_state, self.state)

    @property
    def ring_size(self) -> int:
        return RING_SIZES[self.rule]

    @property
    def ring(self) -> bytes:
        """What the host's ring holds after `written`: its last bytes (oldest overwritten)."""
        return self.written[-self.ring_size :]


CASES = [
    Case("empty-read", b"", None, None),
    Case("started", b"STARTED\n", STARTED, STARTED),
    Case("stopped", b"STOPPED\n", STOPPED, STOPPED),
    Case("connected-ignored", b"CONNECTED\n", CONNECTED, None),
    Case("started-then-stopped", b"STARTED\nSTOPPED\n", STOPPED, STOPPED),
    Case("stopped-then-started", b"STOPPED\nSTARTED\n", STARTED, STARTED),
    Case("partial-line-only", b"STARTED", None, None),
    Case("complete-then-partial", b"STOPPED\nSTART", STOPPED, STOPPED),
    Case("lone-newline", b"\n", "", None),
    Case("crlf-is-not-started", b"STARTED\r\n", "STARTED\r", None),
    Case("lowercase-ignored", b"started\n", "started", None),
    Case("leading-space-ignored", b" STARTED\n", " STARTED", None),
    Case("junk-line", b"\xff\xfe\x01\n", "\ufffd\ufffd\x01", None),
    Case("junk-then-stopped", b"\xff\x01\x80\nSTOPPED\n", STOPPED, STOPPED),
    # QEMU's utf8 reply is a C string: it stops at the first NUL, whatever follows.
    Case("nul-cuts-a-wrapped-status", b"STOPPED\n\x00TOPPED\n", STOPPED, STOPPED),
    Case("nul-hides-a-later-status", b"X\n\x00STARTED\n", "X", None),
    Case("nul-first-is-an-empty-read", b"\x00STOPPED\n", None, None),
    Case("junk-with-nul-hides-stopped", b"\xff\x00\x80\nSTOPPED\n", None, None),
    # Modified UTF-8: C0 80 is a NUL character, not the end of the reply.
    Case("overlong-nul-does-not-cut", b"\xc0\x80\nSTOPPED\n", STOPPED, STOPPED),
    Case("overlong-nul-glued-to-status", b"\xc0\x80STARTED\n", "\x00STARTED", None),
    # One U+FFFD per invalid sequence, QEMU's way (Python's decoder gives three, or U+FFFE).
    Case("overlong-is-one-replacement", b"\xe0\x80\x80x\n", "\ufffdx", None),
    Case("noncharacter-is-replaced", b"\xef\xbf\xbe\n", "\ufffd", None),
    Case("astral-character-kept", b"\xf0\x9f\x98\x80\nSTARTED\n", STARTED, STARTED),
    Case("invalid-utf8-glued-to-status", b"\xffSTOPPED\n", "\ufffdSTOPPED", None),
    # Wrapped rings: the guest wrote more than 16 bytes between two reads.
    Case("wrapped-three-lines", b"STARTED\nSTOPPED\nCONNECTED\n", CONNECTED, None),
    Case("wrapped-started-then-connected", b"STARTED\nCONNECTED\n", CONNECTED, None),
    Case("wrapped-stopped-survives", b"CONNECTED\nSTARTED\nSTOPPED\n", STOPPED, STOPPED),
    Case("tail-of-long-write-glued", b"x" * 40 + b"STARTED\n", "x" * 8 + STARTED, None),
    Case("tail-of-long-write-newline", b"x" * 40 + b"\nSTARTED\n", STARTED, STARTED),
    Case("wrap-cuts-the-status-line", b"STOPPED\n" + b"x" * 10, "OPPED", None),
    Case("incus-json-line-is-not-a-status-to-lxd", b'STARTED\n{"a":1}\n', '{"a":1}', None),
    Case("incus-partial-json-after-status", b'STARTED\n{"a":1}', STARTED, STARTED),
    # Incus 7.3's rule, on its 16 KiB ring: with more than two entries the line before last is
    # read as a JSON state (kept with pid 1) and the status comes from the line before it.
    Case("i-started", b"STARTED\n", STARTED, STARTED, INCUS),
    Case("i-stopped", b"STOPPED\n", STOPPED, STOPPED, INCUS),
    Case(
        "i-state-after-started",
        b'STARTED\n{"pid":1,"os_info":{"os":"Debian"}}\n',
        STARTED,
        STARTED,
        INCUS,
        {"pid": 1, "os_info": {"os": "Debian"}},
    ),
    Case("i-state-of-another-pid-is-dropped", b'STARTED\n{"pid":2}\n', STARTED, STARTED, INCUS),
    Case("i-json-without-pid-is-dropped", b'STARTED\n{"state":"up"}\n', STARTED, STARTED, INCUS),
    Case("i-json-after-stopped", b"STOPPED\n{}\n", STOPPED, STOPPED, INCUS),
    # One read of STARTED and then STOPPED: the line before last wins, so STARTED.
    Case("i-started-then-stopped-reads-started", b"STARTED\nSTOPPED\n", STARTED, STARTED, INCUS),
    Case(
        "i-doubled-stopped-reads-stopped", b"STARTED\nSTOPPED\nSTOPPED\n", STOPPED, STOPPED, INCUS
    ),
    Case(
        "i-doubled-started-reads-started", b"STOPPED\nSTARTED\nSTARTED\n", STARTED, STARTED, INCUS
    ),
    Case("i-json-then-started", b'STOPPED\n{"a":1}\nSTARTED\n', '{"a":1}', None, INCUS),
    Case("i-json-alone", b'{"a":1}\n', '{"a":1}', None, INCUS),
    Case("i-partial-json", b'STOPPED\n{"a":', STOPPED, STOPPED, INCUS),
    Case("i-connected-then-json", b"CONNECTED\n{}\n", CONNECTED, None, INCUS),
    Case("i-empty-read", b"", None, None, INCUS),
    Case("i-no-newline", b"STARTED", None, None, INCUS),
    Case("i-long-json", b"STARTED\n{" + b"x" * 9000 + b"}\n", STARTED, STARTED, INCUS),
    # The JSON line overwrote the status line: the wrapped tail is no status.
    Case(
        "i-wrap-cuts-the-status-line",
        b"STARTED\n{" + b"x" * 17000 + b"}\n",
        "x" * (INCUS_RING_SIZE - 2) + "}",
        None,
        INCUS,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_interpret_ring_read_follows_each_hosts_rule(case: Case) -> None:
    assert interpret_ring_read(case.ring, case.rule) == case.reading


def test_interpret_ring_read_handles_any_byte_and_long_input() -> None:
    every_byte = bytes(range(256)) * 64
    assert interpret_ring_read(every_byte).status is None
    assert interpret_ring_read(b"y" * 1_000_000 + b"\nSTOPPED\n").status == STOPPED


async def _utf8_reply(qemu: QemuProcess, written: bytes, size: int) -> str:
    """What LXD's host gets: write into a fresh (or drained) ring, read it `format: utf8`."""
    if written:
        await write_ring(qemu, "ring", written)
    reply = await qemu.qmp.execute(
        "ringbuf-read", {"device": "ring", "size": size, "format": "utf8"}
    )
    assert isinstance(reply, str)
    return reply


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_qemus_utf8_reply_gives_the_tables_line_and_status(case: Case) -> None:
    """The table's expectations hold for the very reply LXD's host gets from QEMU."""

    async def scenario() -> str:
        async with ring_qemu("ring", size=case.ring_size) as qemu:
            return await _utf8_reply(qemu, case.written, case.ring_size)

    reply = run(scenario())
    assert reply == qemu_utf8_text(case.ring)
    assert interpret_ring_text(reply, case.rule) == case.reading


# Bytes a guest (or a wrapped ring) can leave: status lines, NULs, every kind of bad UTF-8.
_PIECES = st.sampled_from(
    [
        b"STARTED\n", b"STOPPED\n", b"CONNECTED\n", b"\n", b"\x00", b"\xc0\x80", b"\xc0",
        b"\x80", b"\xff", b"\xfe", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xef\xbf\xbe",
        b"\xef\xb7\x90", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
        b"\xfc\x84\x80\x80\x80\x80", b"\xe2\x82", b"\xf0\x9f\x98",
    ]
)  # fmt: skip


_GUEST_BYTES = st.one_of(
    st.binary(max_size=80),
    st.lists(
        st.one_of(_PIECES, st.binary(max_size=4), st.text(max_size=3).map(str.encode)),
        max_size=20,
    ).map(b"".join),
)


@pytest.mark.parametrize("size", [16, 64])
def test_fuzz_rule_matches_a_live_qemu_utf8_read(size: int) -> None:
    """Any bytes: the pure function's text and verdict are those of QEMU's own utf8 reply."""
    loop = asyncio.new_event_loop()
    qemu = ring_qemu("ring", size=size)
    try:
        loop.run_until_complete(bounded(qemu.__aenter__(), TEST_DEADLINE))

        @settings(max_examples=400, deadline=None, database=None)
        @given(written=_GUEST_BYTES)
        def check(written: bytes) -> None:
            reply = loop.run_until_complete(
                bounded(_utf8_reply(qemu, written, size), TEST_DEADLINE)
            )
            ring = written[-size:]
            assert reply == qemu_utf8_text(ring)
            for rule in ReadingRule:
                assert interpret_ring_text(reply, rule) == interpret_ring_read(ring, rule)

        check()
    finally:
        loop.run_until_complete(qemu.__aexit__(None, None, None))
        loop.close()
