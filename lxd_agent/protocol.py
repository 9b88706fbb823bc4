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
"""Incus's status port. The LXD agent never writes to it; the host harness wires it."""

CANDIDATE_PORT_NAMES = (PORT_NAME, LEGACY_PORT_NAME)

# Status lines, exactly as LXD's host reads them (one line per write, newline-terminated).
STARTED = "STARTED"
STOPPED = "STOPPED"
CONNECTED = "CONNECTED"
STATUS_LINES = (STARTED, STOPPED)

# LXD's own agent rewrites STARTED every 5 s because the host's ringbuf-read consumes it.
DEFAULT_REFRESH_SECONDS = 5.0

# LXD gives the ring buffer 16 bytes; QEMU requires a power of two.
DEFAULT_RING_SIZE = 16
