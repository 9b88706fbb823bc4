"""A daemon's console over its API: a WebSocket (RFC 6455) on the daemon's unix socket.

Incus keeps a VM's console in a ring buffer until a client attaches through its API (`POST
/1.0/instances/NAME/console`, then the operation's websocket); only then does it hand QEMU a
socket. `WebSocketPort` is that client, with what `vm.console.SerialConsole`'s reader needs
(`read`, `write`, `in_waiting`, `close`), so the harness reads and types on a daemon's console
as on a pty. Binary frames carry the console's bytes both ways; the client masks what it sends,
answers pings, and takes a close frame as the end. Host side only.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
from pathlib import Path

from lxd_agent_harness.base.errors import DaemonError

READ_TIMEOUT = 0.1
"""Seconds a read waits for bytes before it returns none (the reader thread polls)."""

_BINARY, _CLOSE, _PING, _PONG = 0x2, 0x8, 0x9, 0xA


class WebSocketPort:
    """A console websocket at `path` (with its query) on the daemon's unix `socket_path`."""

    def __init__(self, socket_path: Path, path: str, daemon: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = bytearray()
        self._closed = False
        try:
            self._socket.settimeout(30)
            self._socket.connect(str(socket_path))
            key = base64.b64encode(os.urandom(16)).decode()
            self._socket.sendall(
                (
                    f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = self._read_head()
        except OSError as e:
            self._socket.close()
            raise DaemonError(
                f"{daemon}: the console's websocket could not be opened ({e})", daemon=daemon
            ) from None
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self._socket.close()
            raise DaemonError(
                f"{daemon} refused the console's websocket: {status.decode(errors='replace')}",
                daemon=daemon,
                request=f"GET {path.split('?')[0]}",
                error=status.decode(errors="replace"),
            )
        self._socket.settimeout(READ_TIMEOUT)

    def _read_head(self) -> bytes:
        while b"\r\n\r\n" not in self._buffer:
            chunk = self._socket.recv(4096)
            if not chunk:
                raise OSError("the daemon closed the connection")
            self._buffer += chunk
        end = self._buffer.index(b"\r\n\r\n") + 4
        head = bytes(self._buffer[:end])
        del self._buffer[:end]
        return head

    @property
    def in_waiting(self) -> int:
        return 0  # the reader asks for at least one byte and gets what there is

    def _frame(self) -> tuple[int, bytes] | None:
        """The first whole frame in the buffer (opcode, payload), taken out of it."""
        data = self._buffer
        if len(data) < 2:
            return None
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            if len(data) < 4:
                return None
            (length,) = struct.unpack(">H", data[2:4])
            offset = 4
        elif length == 127:
            if len(data) < 10:
                return None
            (length,) = struct.unpack(">Q", data[2:10])
            offset = 10
        if data[1] & 0x80:  # a server's frames are not masked; take one that is all the same
            mask, offset = bytes(data[offset : offset + 4]), offset + 4
        else:
            mask = b""
        if len(data) < offset + length:
            return None
        payload = bytes(data[offset : offset + length])
        del data[: offset + length]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return opcode, payload

    def read(self, size: int = 1) -> bytes:
        if self._closed:
            raise OSError("the console's websocket was closed")
        try:
            chunk = self._socket.recv(max(size, 65536))
        except TimeoutError:
            chunk = b""
        else:
            if not chunk:
                raise OSError("the daemon closed the console's websocket")
        self._buffer += chunk
        out = bytearray()
        while (frame := self._frame()) is not None:
            opcode, payload = frame
            if opcode == _CLOSE:
                self._closed = True
                break
            if opcode == _PING:
                self._send(_PONG, payload)
            elif opcode != _PONG:
                out += payload
        return bytes(out)

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._socket.sendall(head + mask + masked)

    def write(self, b: bytes, /) -> int:
        self._send(_BINARY, b)
        return len(b)

    def close(self) -> None:
        if not self._closed:
            with contextlib.suppress(OSError):
                self._send(_CLOSE, struct.pack(">H", 1000))
            self._closed = True
        self._socket.close()
