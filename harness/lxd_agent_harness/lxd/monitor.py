"""Watch a VM's status ring buffers over QMP and tell, as LXD's host would, whether the agent is up.

The rule a host applies to what one `ringbuf-read` returns (LXD's, or Incus's) is
`lxd_agent_harness.lxd.reading_rules.interpret_ring_read`, and lives there and nowhere else.

`RingbufMonitor` reads `base64` (so the timeline shows the bytes as they were) and applies the
rule to what a utf8 read would have returned. It reads when LXD's host does: once at start,
after every QMP event of any type (so a guest's open-write-close, which QEMU reports as
`VSERPORT_CHANGE`, is read within milliseconds) and after 10 s without an event, and keeps a
bounded, timestamped timeline of events, reads (each naming what set it off) and state
changes that callers can await and print.

What the ring holds comes from an untrusted guest: binary junk, lines longer than the ring, and
floods of events must never crash or stall the monitor, nor grow its memory without bound.
Host side only: the guest agent never imports this module. It reads rings; it never writes
to them and never starts or stops QEMU (see `lxd_agent_harness.qemu.process`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import enum
import json
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Iterable, Sequence

from qemu.qmp import QMPClient, QMPError
from qemu.qmp.message import Message

from lxd_agent.protocol import DEFAULT_REFRESH_SECONDS, DEFAULT_RING_SIZE, STARTED, STOPPED
from lxd_agent_harness.base.aio import bounded, wait_event
from lxd_agent_harness.base.errors import MonitorError, MonitorTimeout
from lxd_agent_harness.lxd.layouts import Ring
from lxd_agent_harness.lxd.reading_rules import interpret_ring_read
from lxd_agent_harness.qemu.process import BoundedEventListener

DEFAULT_POLL_SECONDS = 10.0

QEMU_EVENT_DELAY = 1.0
"""QEMU holds a port's `VSERPORT_CHANGE` events to one a second (facts §1): a line written
just after an event shows up to 1 s late."""
REFRESH_SLACK = 1.0
"""The read itself, the agent's own loop and a loaded TCG guest's late timers."""
ONE_REFRESH = DEFAULT_REFRESH_SECONDS + QEMU_EVENT_DELAY + REFRESH_SLACK
"""How long after a port returns, a host reader restarts or a guest resumes, a refreshing agent's
STARTED must have been seen."""
"""LXD's host reads every ring after this long without a QMP event."""

START_TRIGGER = "start"
"""What set off the read `start()` makes, in the timeline."""

DEFAULT_TIMELINE_LENGTH = 2000
"""Entries kept: the first half and the most recent half; those in between are counted."""

DEFAULT_TEXT_LIMIT = 120
"""Characters of a ring's content (escaped) or an event kept in one timeline entry."""


# -- the timeline ----------------------------------------------------------------------------


# A QEMU that does not answer one read in this long is wedged; no wait may be unbounded.
READ_TIMEOUT = 10.0


class EntryKind(str, enum.Enum):
    EVENT = "event"  # a QMP event, as QEMU sent it
    READ = "read"  # a non-empty ring read, escaped and truncated
    STATE = "state"  # a ring's state changed
    NOTE = "note"  # the caller's milestones (QEMU start, power-off) and the monitor's own


@dataclass(frozen=True)
class TimelineEntry:
    seconds: float
    """Monotonic seconds since the monitor's t0."""
    kind: EntryKind
    text: str
    port: str | None = None
    trigger: str | None = None
    """For a read: what set it off (a QMP event's name, `start`, `idle 10 s`, a caller's reason)."""

    def render(self) -> str:
        where = f"{self.port}: " if self.port else ""
        why = f" [{self.trigger}]" if self.trigger else ""
        return f"{self.seconds:9.3f}s  {self.kind.value:<5}  {where}{self.text}{why}"


class Timeline:
    """A bounded record: keeps the first and the latest entries and counts those in between.

    The start (QEMU up, the first `STARTED`) and the end (power-off, `STOPPED`) are what a
    reader of a failure needs; a flood in the middle is summarised as a count.
    """

    def __init__(self, t0: float, max_entries: int = DEFAULT_TIMELINE_LENGTH) -> None:
        if max_entries < 2:
            raise ValueError(f"a timeline keeps at least 2 entries, not {max_entries}")
        self.t0 = t0
        self._head_size = max_entries // 2
        self._head: list[TimelineEntry] = []
        self._tail: collections.deque[TimelineEntry] = collections.deque(
            maxlen=max_entries - self._head_size
        )
        self.dropped = 0

    def add(
        self, kind: EntryKind, text: str, port: str | None = None, trigger: str | None = None
    ) -> TimelineEntry:
        entry = TimelineEntry(time.monotonic() - self.t0, kind, text, port, trigger)
        if len(self._head) < self._head_size:
            self._head.append(entry)
        else:
            if len(self._tail) == self._tail.maxlen:
                self.dropped += 1
            self._tail.append(entry)
        return entry

    @property
    def entries(self) -> tuple[TimelineEntry, ...]:
        """The kept entries, oldest first (a gap of `dropped` entries after the first half)."""
        return (*self._head, *self._tail)

    def render(self) -> list[str]:
        lines = [entry.render() for entry in self._head]
        if self.dropped:
            lines.append(f"{'':>10}  ... {self.dropped} entries left out ...")
        lines.extend(entry.render() for entry in self._tail)
        return lines


def state_changes(entries: Iterable[TimelineEntry], port: str) -> list[str]:
    """`port`'s state changes in order, e.g. `unknown -> STARTED`."""
    return [e.text for e in entries if e.kind is EntryKind.STATE and e.port == port]


def reads(entries: Iterable[TimelineEntry], port: str) -> list[str]:
    """What the reads of `port`'s ring returned, where they returned anything."""
    return [e.text for e in entries if e.kind is EntryKind.READ and e.port == port]


@dataclass(frozen=True)
class StateRead:
    """One read by Incus 7.3's rule and the instance state it left the host holding."""

    seconds: float
    port: str
    state: dict[str, object] | None


def describe_state(state: dict[str, object] | None) -> str:
    """What `incus list` would show from an instance state: the OS, the host name, addresses."""
    if state is None:
        return "none (the host shows what it learns by itself)"
    os_info = state.get("os_info")
    parts = []
    if isinstance(os_info, dict):
        os_name = " ".join(str(os_info.get(k, "")) for k in ("os", "os_version")).strip()
        parts += [p for p in (os_name, str(os_info.get("hostname") or "")) if p]
    network = state.get("network")
    if isinstance(network, dict):
        for name, interface in sorted(network.items()):
            addresses = interface.get("addresses") if isinstance(interface, dict) else None
            for address in addresses if isinstance(addresses, list) else []:
                if isinstance(address, dict) and address.get("scope") == "global":
                    parts.append(f"{name} {address.get('address')}")
    return ", ".join(parts) or "present (no OS or address in it)"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more chars)"


def _describe_event(event: Message, limit: int) -> str:
    data = event.get("data")
    if not isinstance(data, dict):
        return str(event.get("event"))
    fields = " ".join(f"{key}={json.dumps(value)}" for key, value in data.items())
    return _clip(f"{event.get('event')} {fields}", limit)


# -- the monitor -----------------------------------------------------------------------------


class RingbufMonitor:
    """Reads a VM's status rings over QMP the way LXD's host does, and records what it saw.

    ``qmp`` is a connected client (e.g. `QemuProcess.qmp`); ``rings`` usually
    `Layout.rings`. ``t0`` is the `time.monotonic()` value the timeline counts from (give the
    launcher's QEMU start so its own `note()`s line up); default: now. ``read_size`` is the
    `size` of each `ringbuf-read` (LXD's is 16, its ring size). Use as an async context
    manager; the reader tasks stop on exit::

        async with RingbufMonitor(qemu.qmp, layout.rings, t0=t0) as monitor:
            await monitor.wait_for(STARTED, port=PORT_NAME, timeout=30.0)
            print("\\n".join(monitor.render_timeline()))
    """

    def __init__(
        self,
        qmp: QMPClient,
        rings: Sequence[Ring],
        *,
        t0: float | None = None,
        read_size: int = DEFAULT_RING_SIZE,
        poll_interval: float = DEFAULT_POLL_SECONDS,
        max_timeline: int = DEFAULT_TIMELINE_LENGTH,
        text_limit: int = DEFAULT_TEXT_LIMIT,
    ) -> None:
        if not rings:
            raise MonitorError("no ring buffer to monitor; give the layout's `rings`")
        self.qmp = qmp
        self.rings = tuple(rings)
        self.read_size = read_size
        self.poll_interval = poll_interval
        self.text_limit = text_limit
        self.timeline = Timeline(time.monotonic() if t0 is None else t0, max_timeline)
        self._states: dict[str, str | None] = {ring.port_name: None for ring in self.rings}
        self._listener = BoundedEventListener()
        self._read_requested = asyncio.Event()
        # The first QMP event since the last read started, and how many came: they name what
        # sets off the next read (a count, not a list: a guest can flood events).
        self._first_unread: str | None = None
        self._unread = 0
        self._state_changed = asyncio.Event()
        self._read_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: str | None = None
        self._reads = 0
        self._last_changed: str | None = None  # the port whose state changed last
        self.opened: dict[str, float] = {}
        """Port device ids the guest opened (`VSERPORT_CHANGE` with `open: true`), each with the
        first time, in seconds since t0. A port with no chardev (LXD's legacy stub) shows here
        too: QEMU reports the guest's open whatever is behind the port."""
        self.instance_states: dict[str, dict[str, object] | None] = {}
        """Incus 7.3: the instance state each ring's host holds now (the JSON line of the last
        read with more than one line; None once a read cleared it), by port name."""
        self.state_reads: list[StateRead] = []
        """Incus 7.3: every read that set an instance state (or cleared it), in order."""
        self.last_opened: dict[str, float] = {}
        """The same, with the latest time: a refreshing agent's last write (QEMU sends a port's
        first event at once, and an agent writing every 5 s is never held by its 1 s limit)."""

    # -- what callers ask -----------------------------------------------------------------------

    def state(self, port: str | None = None) -> str | None:
        """`STARTED`, `STOPPED`, or None (nothing seen yet) for `port`'s ring.

        With no `port`: the only ring's state, or for several rings the latest one any ring
        reported (a bridged VM is up when either ring says so).
        """
        if port is not None:
            return self._states[self._check_port(port)]
        if len(self.rings) == 1:
            return self._states[self.rings[0].port_name]
        return None if self._last_changed is None else self._states[self._last_changed]

    @property
    def states(self) -> dict[str, str | None]:
        """Every ring's state, by port name."""
        return dict(self._states)

    @property
    def reads(self) -> int:
        """How many `ringbuf-read` commands have completed (each ring counts)."""
        return self._reads

    def forget(self, port: str, why: str) -> None:
        """Set `port`'s state back to unknown, so that `wait_for` waits for a fresh line.

        For a caller that changed something under the ring (replugged its port) and must see
        the agent report again; `why` goes into the timeline.
        """
        before = self._states[self._check_port(port)]
        self._states[port] = None
        self.timeline.add(EntryKind.STATE, f"{before or 'unknown'} -> unknown ({why})", port)

    def note(self, text: str) -> TimelineEntry:
        """Record a caller's milestone (`QEMU started`, `system_powerdown sent`) in the timeline."""
        return self.timeline.add(EntryKind.NOTE, _clip(text, self.text_limit * 2))

    def render_timeline(self) -> list[str]:
        """The timeline as printable lines, oldest first."""
        return self.timeline.render()

    async def wait_for(
        self, status: str, *, port: str | None = None, timeout: float
    ) -> TimelineEntry:
        """Wait until `port`'s ring (any ring when None) is in `status`; the entry that said so.

        Returns at once if it already is. A `MonitorTimeout` (its `timeline` field set) after
        `timeout` s; a `MonitorError` as soon as the monitor can no longer read the rings.
        """
        if status not in (STARTED, STOPPED):
            raise MonitorError(
                f"cannot wait for {status!r}: a ring's state is {STARTED} or {STOPPED}"
            )
        ports = [self._check_port(port)] if port is not None else list(self._states)
        where = port if port is not None else " or ".join(ports)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for name in ports:
                if self._states[name] == status:
                    return self._last_state_entry(name)
            if self._failure is not None:
                raise MonitorError(
                    f"stopped reading the rings while waiting for {status} on {where}: "
                    f"{self._failure}",
                    timeline=self.render_timeline(),
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise MonitorTimeout(
                    f"no {status} on {where} within {timeout:g} s (state: {self._states}); "
                    "check the guest console and the timeline",
                    timeline=self.render_timeline(),
                )
            self._state_changed.clear()
            await wait_event(self._state_changed, remaining)

    async def read_rings(self, trigger: str = "request") -> dict[str, bytes]:
        """Read every ring once now and apply what they hold; the bytes read, by port name.

        `trigger` says in the timeline why this read happened (the caller's reason).
        """
        read: dict[str, bytes] = {}
        async with self._read_lock:
            for ring in self.rings:
                data = await self._read_ring(ring)
                self._reads += 1
                if data:
                    self._apply(ring, data, trigger)
                read[ring.port_name] = data
        return read

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> RingbufMonitor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen for QMP events, read once, then keep reading. Prefer `async with`."""
        self.qmp.register_listener(self._listener)
        try:
            await self.read_rings(START_TRIGGER)
        except BaseException:
            self.qmp.remove_listener(self._listener)
            raise
        self._tasks = [
            asyncio.ensure_future(self._follow_events()),
            asyncio.ensure_future(self._keep_reading()),
        ]

    async def stop(self) -> None:
        """Cancel the reader tasks and stop listening. Safe to call more than once."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Already removed, or never registered: qemu.qmp raises ListenerError or ValueError.
        with contextlib.suppress(QMPError, ValueError):
            self.qmp.remove_listener(self._listener)

    # -- inside -------------------------------------------------------------------------------

    def _check_port(self, port: str) -> str:
        if port not in self._states:
            raise MonitorError(
                f"port {port!r} has no ring buffer here; monitored: {', '.join(self._states)}"
            )
        return port

    def _last_state_entry(self, port: str) -> TimelineEntry:
        for entry in reversed(self.timeline.entries):
            if entry.kind is EntryKind.STATE and entry.port == port:
                return entry
        # Left out of a flooded timeline: say so rather than invent a time.
        return TimelineEntry(
            time.monotonic() - self.timeline.t0, EntryKind.NOTE, "state change not kept", port
        )

    async def _read_ring(self, ring: Ring) -> bytes:
        command = self.qmp.execute(
            "ringbuf-read",
            {"device": ring.chardev_id, "size": self.read_size, "format": "base64"},
        )
        try:
            reply = await bounded(command, READ_TIMEOUT)
        except asyncio.TimeoutError:
            raise MonitorError(
                f"ringbuf-read of chardev {ring.chardev_id!r} ({ring.port_name}) got no answer "
                f"within {READ_TIMEOUT:g} s; is QEMU wedged? Its log says more"
            ) from None
        except QMPError as err:
            raise MonitorError(
                f"ringbuf-read of chardev {ring.chardev_id!r} ({ring.port_name}) failed: "
                f"{type(err).__name__}: {err}; does QEMU still run, with this layout's arguments?"
            ) from err
        if not isinstance(reply, str):
            raise MonitorError(
                f"ringbuf-read of {ring.chardev_id} returned {type(reply).__name__}, "
                "not base64 text; is this QEMU's QMP?"
            )
        try:
            return base64.b64decode(reply, validate=True)
        except binascii.Error as err:
            raise MonitorError(f"ringbuf-read of {ring.chardev_id}: bad base64 ({err})") from None

    def _apply(self, ring: Ring, data: bytes, trigger: str) -> None:
        reading = interpret_ring_read(data, ring.rule)
        shown = _clip(repr(data.decode("utf-8", errors="replace")), self.text_limit)
        meaning = f" -> {reading.status}" if reading.status else " (no change)"
        read = self.timeline.add(EntryKind.READ, f"{shown}{meaning}", ring.port_name, trigger)
        if reading.sets_state:
            held = self.instance_states.get(ring.port_name)
            self.instance_states[ring.port_name] = reading.state
            self.state_reads.append(StateRead(read.seconds, ring.port_name, reading.state))
            if held != reading.state:
                self.timeline.add(
                    EntryKind.NOTE,
                    _clip(f"instance state: {describe_state(reading.state)}", self.text_limit),
                    ring.port_name,
                )
        if reading.status is None:
            return
        before = self._states[ring.port_name]
        if reading.status != before:
            self._states[ring.port_name] = reading.status
            self._last_changed = ring.port_name
            self.timeline.add(
                EntryKind.STATE, f"{before or 'unknown'} -> {reading.status}", ring.port_name
            )
            self._state_changed.set()

    async def _follow_events(self) -> None:
        seen_dropped = 0
        # Every event, whatever its type and id: LXD's host reads after each one.
        async for event in self._listener:
            entry = self.timeline.add(EntryKind.EVENT, _describe_event(event, self.text_limit))
            self._note_port_open(event, entry.seconds)
            if self._listener.dropped != seen_dropped:
                self.note(f"{self._listener.dropped - seen_dropped} QMP events dropped (flood)")
                seen_dropped = self._listener.dropped
            if self._first_unread is None:
                self._first_unread = str(event.get("event"))
            self._unread += 1
            self._read_requested.set()

    def _note_port_open(self, event: Message, seconds: float) -> None:
        data = event.get("data")
        if event.get("event") != "VSERPORT_CHANGE" or not isinstance(data, dict):
            return
        device_id = data.get("id")
        # Device ids are QEMU's own (the layout's), never the guest's: this stays small.
        if data.get("open") is True and isinstance(device_id, str):
            self.opened.setdefault(device_id, seconds)
            self.last_opened[device_id] = seconds

    def _take_event_trigger(self) -> str:
        """What set off an event-driven read: the first event's name, and how many came after."""
        name, more = self._first_unread or "QMP event", self._unread - 1
        self._first_unread, self._unread = None, 0
        return f"{name} +{more} more" if more > 0 else name

    async def _keep_reading(self) -> None:
        try:
            while True:
                requested = await wait_event(self._read_requested, self.poll_interval)
                # Events that arrive while reading ask for one more read, not one each:
                # a flood of events costs back-to-back reads, never a backlog.
                self._read_requested.clear()
                if requested:
                    trigger = self._take_event_trigger()
                else:
                    trigger = f"idle {self.poll_interval:g} s"
                await self.read_rings(trigger)
        except asyncio.CancelledError:
            raise
        except (MonitorError, OSError, EOFError) as err:
            self._failure = str(err)
            self.note(f"monitor stopped: {self._failure}")
            self._state_changed.set()  # wake waiters so they fail now, not at their timeout
