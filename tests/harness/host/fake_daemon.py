"""A small server of LXD's API shape on a unix socket, for the host layer's tests: each
(method, path) gets the answer set for it in `answers`, and every request is kept in `seen`."""

from __future__ import annotations

import json
import socketserver
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

ANSWERS: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {
    ("GET", "/1.0"): (200, {"type": "sync", "metadata": {"environment": {"server": "lxd"}}}),
    ("POST", "/1.0/instances/vm/exec"): (
        202,
        {"type": "async", "operation": "/1.0/operations/op1", "metadata": {}},
    ),
    ("GET", "/1.0/operations/op1/wait?timeout=600"): (
        200,
        {
            "type": "sync",
            "metadata": {
                "status": "Failure",
                "status_code": 400,
                "err": "LXD VM agent isn't currently running",
            },
        },
    ),
    ("POST", "/1.0/instances"): (
        202,
        {"type": "async", "operation": "/1.0/operations/op2", "metadata": {}},
    ),
    # Incus answers the wait of a failed operation with an error envelope.
    ("GET", "/1.0/operations/op2/wait?timeout=600"): (
        500,
        {"type": "error", "error": "Unknown configuration key: x", "error_code": 500},
    ),
    ("DELETE", "/1.0/images/none"): (
        404,
        {"type": "error", "error": "Image not found", "error_code": 404},
    ),
}


class Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str, bytes]]] = []
    answers: ClassVar[dict[tuple[str, str], tuple[int, dict[str, Any]]]] = ANSWERS

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append((self.command, self.path, self.rfile.read(length)))
        status, body = self.answers.get((self.command, self.path), (500, {"type": "error"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
