"""The REST API of an LXD or Incus daemon, over its unix socket.

Both daemons speak the same API on `unix.socket` (`/1.0/...`): a JSON envelope of `type`
(`sync`, `async`, `error`), `status_code`, `error` and `metadata`; an `async` answer names an
operation, waited for at `/1.0/operations/ID/wait`. This module sends requests and returns the
`metadata`, or raises a `DaemonError` that carries the daemon's own error text as a field. No
CLI (`lxc`, `incus`) is run and no message is parsed. Blocking calls (http.client): the host
layer runs them in a thread. Host side only.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable

from lxd_agent_harness.base.errors import DaemonError

REQUEST_TIMEOUT = 600.0
"""Seconds a request may take: an image import or a VM's start under TCG takes a while."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class Daemon:
    """A daemon's socket and what to call it in errors (`lxd`, `incus`)."""

    socket: Path
    kind: str

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: IO[bytes] | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
        wait: bool = True,
    ) -> Any:
        """The answer's `metadata` (an `async` answer's operation already waited for; with
        `wait=False`, the whole `async` answer: its `operation` and the operation's `metadata`,
        for an operation that runs until the client connects to it, like a console)."""
        what = f"{method} {path}"
        sent_headers = dict(headers or {})
        payload: Any = raw
        if body is not None:
            payload = json.dumps(body).encode()
            sent_headers["Content-Type"] = "application/json"
        connection = _UnixConnection(self.socket, timeout)
        try:
            connection.request(method, path, body=payload, headers=sent_headers)
            response = connection.getresponse()
            text = response.read()
            status = response.status
        except OSError as e:
            raise DaemonError(
                f"{self.kind} did not answer {what} on {self.socket} ({e}); is the daemon up?",
                daemon=self.kind,
                request=what,
            ) from None
        finally:
            connection.close()
        try:
            answer = json.loads(text)
        except ValueError:
            raise DaemonError(
                f"{self.kind} answered {what} with HTTP {status} and no JSON",
                daemon=self.kind,
                request=what,
                status_code=status,
                error=text[:200].decode(errors="replace"),
            ) from None
        if answer.get("type") == "error" or status >= 400:
            error = str(answer.get("error", ""))
            raise DaemonError(
                f"{self.kind} refused {what}: {error}",
                daemon=self.kind,
                request=what,
                status_code=status,
                error=error,
            )
        if answer.get("type") == "async" and not wait:
            return answer
        if answer.get("type") == "async":
            return self.wait(str(answer["operation"]), what, timeout)
        return answer.get("metadata")

    def wait(self, operation: str, what: str, timeout: float = REQUEST_TIMEOUT) -> Any:
        """An operation's metadata once it is done; a `DaemonError` with its `err` if it failed."""
        try:
            done = self.request(
                "GET", f"{operation}/wait?timeout={int(timeout)}", timeout=timeout + 10
            )
        except DaemonError as e:
            # Incus answers the wait of a failed operation with the operation's error: it is
            # the error of the request that made the operation.
            raise DaemonError(
                f"{self.kind}: {what} failed: {e.error}",
                daemon=self.kind,
                request=what,
                status_code=e.status_code,
                error=e.error,
            ) from None
        if done.get("status") != "Success":
            error = str(done.get("err", "")) or str(done.get("status", ""))
            raise DaemonError(
                f"{self.kind}: {what} failed: {error}",
                daemon=self.kind,
                request=what,
                status_code=done.get("status_code"),
                error=error,
            )
        return done
