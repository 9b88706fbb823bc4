"""What one ring-buffer read means to the host: LXD's rule and Incus 7.3's, in one place.

LXD's host asks QEMU's `ringbuf-read` for `format: utf8`; QEMU's reply stops at the first NUL and
replaces invalid UTF-8 its own way (`qemu_utf8_text`). Then it splits on newlines and takes the
last complete line (LXD, and Incus before 7.3). Incus 7.3 (`checkBuffer` in its
`qmp/monitor.go`, facts §10), with more than one piece, takes the last complete line too, but
with more than two it reads that line as a JSON instance state (kept only with `pid` 1) and
takes the status from the line before it, and it sets the instance's state (that JSON, or none)
on every read with more than one piece: a plain `STARTED\n` read clears it. `STARTED` means up,
`STOPPED` down, anything else leaves the status as it was. Pure functions: no I/O. Host side only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lxd_agent.protocol import STARTED, STOPPED
from lxd_agent_harness.lxd.layouts import ReadingRule


@dataclass(frozen=True)
class RingRead:
    """What one `ringbuf-read` means to LXD's host.

    `line` is the last complete line of what a `format: utf8` read returns (`qemu_utf8_text`),
    or None when that holds no newline. `status` is `STARTED` or `STOPPED` when that line
    changes the agent's state, None when the state stays as it was.
    """

    line: str | None
    status: str | None
    sets_state: bool = False
    """Incus 7.3: this read sets the instance's state (to `state`, or to none)."""
    state: dict[str, Any] | None = None
    """Incus 7.3: the JSON instance state the read carried (with `pid` 1), else None."""


# QEMU's `mod_utf8_codepoint` (util/unicode.c): the smallest code point each sequence length
# may encode; anything below is overlong.
_MIN_CODE_POINT = {2: 0x80, 3: 0x800, 4: 0x10000, 5: 0x200000, 6: 0x4000000}


def _valid_code_point(cp: int) -> bool:
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return False
    # Noncharacters: QEMU replaces them too, where Python's decoder keeps them.
    return not (0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE)


def _next_code_point(data: bytes, start: int) -> tuple[int | None, int]:
    """The code point at `start` (None: invalid) and where the next one starts, as QEMU's
    `mod_utf8_codepoint` decodes modified UTF-8 (`C0 80` is U+0000)."""
    lead = data[start]
    if lead < 0x80:
        return lead, start + 1
    if lead >= 0xFE or not lead & 0x40:  # FE/FF, or a stray continuation byte
        return None, start + 1
    length = 8 - (lead ^ 0xFF).bit_length()  # the leading one bits: 2 to 6
    cp: int | None = lead & (0x7F >> length)
    end = start + 1
    for _ in range(length - 1):
        if end >= len(data) or data[end] & 0xC0 != 0x80:
            return None, end  # a missing continuation byte starts the next sequence
        assert cp is not None
        cp = cp << 6 | data[end] & 0x3F
        end += 1
    assert cp is not None
    if cp < _MIN_CODE_POINT[length] and not (cp == 0 and length == 2):
        return None, end  # overlong (but modified UTF-8's NUL)
    return (cp if _valid_code_point(cp) else None), end


def qemu_utf8_text(data: bytes) -> str:
    """What `ringbuf-read` with `format: utf8` returns for a ring holding `data`.

    QEMU hands the bytes on as a C string, so the reply stops at the first NUL (the bytes after
    it are consumed all the same), and its JSON writer turns each invalid sequence (a stray or
    missing continuation byte, an overlong form, a surrogate, a noncharacter, a code point past
    U+10FFFF) into one U+FFFD, where Python's decoder may give several or keep the character.
    Checked against a live QEMU by tests/harness/lxd/test_reading_rules.py.
    """
    data = data.split(b"\0", 1)[0]
    chars: list[str] = []
    position = 0
    while position < len(data):
        cp, position = _next_code_point(data, position)
        chars.append("\ufffd" if cp is None else chr(cp))
    return "".join(chars)


def interpret_ring_text(text: str, rule: ReadingRule = ReadingRule.LXD) -> RingRead:
    """Apply a host's rule (LXD's by default) to the text of one `format: utf8` read.

    Both rules split on newline. LXD takes the last complete line (`entries[len-2]`). Incus
    7.3, whose agent may write `STARTED\n{JSON state}\n`, takes `entries[len-3]` whenever
    there are more than two entries, whether or not `entries[len-2]` is JSON.
    """
    entries = text.split("\n")
    if len(entries) < 2:
        # No newline at all: an empty read or a partial line. Both hosts leave the state alone.
        return RingRead(line=None, status=None)
    # Whatever follows the last newline is an unfinished write; the host takes a line before it.
    line = entries[-2]
    state = None
    if rule is ReadingRule.INCUS and len(entries) > 2:
        state = _instance_state(entries[-2])
        line = entries[-3]
    return RingRead(
        line=line,
        status=line if line in (STARTED, STOPPED) else None,
        sets_state=rule is ReadingRule.INCUS,
        state=state,
    )


def _instance_state(line: str) -> dict[str, Any] | None:
    """Incus 7.3's reading of a state line: JSON of `api.InstanceState`, kept if `pid` is 1."""
    try:
        state = json.loads(line)
    except ValueError:
        return None
    if not isinstance(state, dict) or state.get("pid") != 1:
        return None
    return state


def interpret_ring_read(data: bytes, rule: ReadingRule = ReadingRule.LXD) -> RingRead:
    """What a host concludes from a ring holding `data`: its rule on QEMU's utf8 reply."""
    return interpret_ring_text(qemu_utf8_text(data), rule)
