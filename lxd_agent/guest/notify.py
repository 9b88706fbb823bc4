"""Talk to systemd: readiness and status (sd_notify), the watchdog, and logs to journald.

Runs in the guest. systemd-python (Debian's python3-systemd) does the protocol; sdnotify is
the fallback for pip installs without it. No notify-socket code of our own. Outside systemd
(no NOTIFY_SOCKET) notifications are no-ops and logs go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

LOGGER_NAME = "lxd-agent"

Sender = Callable[[str], None]


class Notifier:
    """Sends sd_notify(3) messages through whichever library is available."""

    def __init__(self, send: Sender | None, backend: str) -> None:
        self._send = send
        self.backend = backend

    @property
    def active(self) -> bool:
        return self._send is not None

    def notify(self, *assignments: str) -> None:
        """Send ``KEY=value`` assignments as one message: ``notify("READY=1", "STATUS=up")``."""
        if self._send is not None:
            self._send("\n".join(assignments))


def _systemd_python_sender() -> Sender | None:
    try:
        import systemd.daemon as daemon
    except ImportError:
        return None

    def send(message: str) -> None:
        daemon.notify(message)

    return send


def _sdnotify_sender() -> Sender | None:
    try:
        import sdnotify
    except ImportError:
        return None
    client = sdnotify.SystemdNotifier()

    def send(message: str) -> None:
        client.notify(message)

    return send


def make_notifier() -> Notifier:
    """Pick systemd-python, then sdnotify; a silent Notifier when not run by systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return Notifier(None, "none (no NOTIFY_SOCKET)")
    for backend, factory in (
        ("systemd-python", _systemd_python_sender),
        ("sdnotify", _sdnotify_sender),
    ):
        send = factory()
        if send is not None:
            return Notifier(send, backend)
    logging.getLogger(LOGGER_NAME).warning(
        "NOTIFY_SOCKET is set but neither systemd-python nor sdnotify is installed: "
        "systemd will not see READY=1; install python3-systemd"
    )
    return Notifier(None, "none (no library)")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when it is off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2


def setup_logging(level: int) -> logging.Logger:
    """Log to journald with structured fields when run by systemd, else to stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER=LOGGER_NAME)
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if isinstance(handler, logging.StreamHandler):
        handler.setFormatter(logging.Formatter(LOGGER_NAME + ": %(message)s"))
    logger.handlers[:] = [handler]
    return logger
