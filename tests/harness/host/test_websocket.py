"""Tests for lxd_agent_harness.host.websocket: a console websocket against a small server of
ours that speaks RFC 6455 as a daemon does (unmasked frames out, masked frames in)."""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lxd_agent_harness.base.errors import DaemonError
from lxd_agent_harness.host.websocket import WebSocketPort

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


def frame(opcode: int, payload: bytes) -> bytes:
    """A server's frame: final, unmasked."""
    if len(payload) < 126:
        return struct.pack(">BB", 0x80 | opcode, len(payload)) + payload
    if len(payload) < 1 << 16:
        return struct.pack(">BBH", 0x80 | opcode, 126, len(payload)) + payload
    return struct.pack(">BBQ", 0x80 | opcode, 127, len(payload)) + payload


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, "the client closed the connection"
        data += chunk
    return data


def client_frame(conn: socket.socket) -> tuple[int, bytes]:
    """A client's frame: it must be masked."""
    first, second = read_exactly(conn, 2)
    assert second & 0x80, "a client's frame is not masked"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack(">H", read_exactly(conn, 2))
    elif length == 127:
        (length,) = struct.unpack(">Q", read_exactly(conn, 8))
    mask = read_exactly(conn, 4)
    payload = read_exactly(conn, length)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


Serve = Callable[[socket.socket], None]


@pytest.fixture
def server(short_tmp_path: Path) -> Iterator[Callable[[Serve, bytes], Path]]:
    """`start(serve, status)`: a unix socket that answers the handshake with `status` and then
    runs `serve` on the connection; its path."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []
    failures: list[BaseException] = []

    def start(serve: Serve, status: bytes = b"101 Switching Protocols") -> Path:
        path = short_tmp_path / f"ws{len(listeners)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listeners.append(listener)

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                try:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += conn.recv(4096)
                    key = next(
                        line.split(b":", 1)[1].strip()
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"sec-websocket-key:")
                    )
                    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
                    conn.sendall(
                        b"HTTP/1.1 " + status + b"\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                    )
                    if status.startswith(b"101"):
                        serve(conn)
                except BaseException as e:  # seen by the test, not lost in the thread
                    failures.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for thread in threads:
        thread.join(timeout=10)
    for listener in listeners:
        listener.close()
    assert not failures, failures


def read_until(port: WebSocketPort, size: int) -> bytes:
    data = b""
    for _ in range(200):
        data += port.read(1)
        if len(data) >= size:
            break
    return data


def test_frames_of_every_length_are_read_and_writes_are_masked(
    server: Callable[[Serve, bytes], Path],
) -> None:
    long, longer = b"x" * 300, b"y" * 70000
    typed: list[bytes] = []
    received = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.sendall(frame(0x2, b"login: ") + frame(0x2, long))
        conn.sendall(frame(0x2, longer)[:5000])  # a frame that comes in pieces
        conn.sendall(frame(0x2, longer)[5000:])
        typed.append(client_frame(conn)[1])
        received.set()

    port = WebSocketPort(server(serve, b"101 Switching Protocols"), "/ws?secret=s", "incus")
    try:
        assert read_until(port, 7 + 300 + 70000) == b"login: " + long + longer
        port.write(b"root\n")
        assert received.wait(10)
    finally:
        port.close()
    assert typed == [b"root\n"]


def test_a_ping_is_answered_and_a_close_ends_the_port(
    server: Callable[[Serve, bytes], Path],
) -> None:
    answers: list[tuple[int, bytes]] = []
    closed = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.sendall(frame(0x9, b"hello") + frame(0x2, b"after the ping"))
        answers.append(client_frame(conn))
        conn.sendall(frame(0x8, struct.pack(">H", 1000)))
        closed.set()

    port = WebSocketPort(server(serve, b"101 Switching Protocols"), "/ws?secret=s", "incus")
    try:
        assert read_until(port, 14) == b"after the ping"
        with pytest.raises(OSError):  # once the close frame came, reading is an error
            for _ in range(200):
                assert port.read(1) == b""
        assert closed.wait(10)
    finally:
        port.close()
    assert answers == [(0xA, b"hello")]


def test_a_refused_upgrade_is_a_daemon_error_with_the_status(
    server: Callable[[Serve, bytes], Path],
) -> None:
    path = server(lambda conn: None, b"403 Forbidden")
    with pytest.raises(DaemonError) as raised:
        WebSocketPort(path, "/1.0/operations/x/websocket?secret=wrong", "incus")
    assert (raised.value.daemon, raised.value.error) == ("incus", "HTTP/1.1 403 Forbidden")
    assert raised.value.request == "GET /1.0/operations/x/websocket"


def test_no_daemon_on_the_socket_is_a_daemon_error(short_tmp_path: Path) -> None:
    with pytest.raises(DaemonError) as raised:
        WebSocketPort(short_tmp_path / "none.sock", "/ws", "lxd")
    assert raised.value.daemon == "lxd"
