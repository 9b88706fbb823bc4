"""The names and lines that the guest agent and the LXD host agree on.

Shared by both sides, so it imports nothing beyond the standard library and holds no logic
that only one side needs. Every port name and status line in the project comes from here.
"""

# The virtio-serial port names, in the order the guest agent tries them.
PORT_NAME = "com.canonical.lxd"
"""LXD >= 5.20 puts its status ring buffer on this port (the specification's new name)."""

LEGACY_PORT_NAME = "org.linuxcontainers.lxd"
"""LXD <= 5.19 used this name; LXD >= 5.20 and Incus still add it, with no chardev behind it."""

INCUS_PORT_NAME = "org.linuxcontainers.incus"
"""Incus's status port (the LXD fork). The agent tries it after both LXD names."""

CANDIDATE_PORT_NAMES = (PORT_NAME, LEGACY_PORT_NAME, INCUS_PORT_NAME)

# Status lines, exactly as LXD's host reads them (one line per write, newline-terminated).
STARTED = "STARTED"
STOPPED = "STOPPED"
CONNECTED = "CONNECTED"
STATUS_LINES = (STARTED, STOPPED)

# How many times a status line goes into one write on each port. Incus 7.3's host takes the
# status from the line before last when a read holds more than one (`entries[len-3]`, room for a
# JSON state line after it), so one `STOPPED\n` read together with an unread `STARTED\n` would
# say STARTED; written twice it reads as itself by that rule, by LXD's (the last line, which
# Incus before 7.3 applies) and in a 16 B ring (`STOPPED\nSTOPPED\n` is 16 bytes).
LINES_PER_WRITE = {INCUS_PORT_NAME: 2}

# Ports whose host may read a JSON line of the guest's state after STARTED (Incus >= 7.3:
# `STARTED\n{json}\n`, facts §10), written only when the state line is switched on
# (`lxd_agent.guest.state`): a host before 7.3 has a 16 B ring, where the JSON crowds STARTED out.
STATE_PORT_NAMES = (INCUS_PORT_NAME,)

MINIMAL_STATE_LINE = '{"pid":1}'
"""The state line of the first STARTED: nothing to gather, so the start costs nothing; the full
one follows at once. Incus keeps it (`pid` 1) and fills in what it lacks from its own side."""

# LXD's own agent rewrites STARTED every 5 s because the host's ringbuf-read consumes it.
DEFAULT_REFRESH_SECONDS = 5.0

# LXD gives the ring buffer 16 bytes; QEMU requires a power of two.
DEFAULT_RING_SIZE = 16
