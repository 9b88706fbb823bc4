"""Talk to systemd: readiness and status (sd_notify), the watchdog, and logs to journald.

Runs in the guest, on the path from exec to READY=1, so it imports only what that path needs:
systemd-python's C modules (``systemd._daemon``, ``systemd._journal``), loaded when first used.
Their public wrappers, ``systemd.daemon`` and ``systemd.journal``, re-export the very same
``notify`` and ``sendv`` but first import ``socket``, ``logging``, ``uuid`` and ``traceback``: some
50 ms and several MiB, more than the rest of the agent's start. They stay the fallback, and
sdnotify after them for pip installs. No notify-socket or journal protocol code of our own, and
no ``logging``: a small ``Log`` with the ``Logger`` methods the agent calls. Outside systemd (no
NOTIFY_SOCKET) notifications are no-ops and logs go to stderr.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Mapping

    Sender = Callable[[str], object]
    JournalSender = Callable[..., object]

LOGGER_NAME = "lxd-agent"

# logging's level numbers, so that a ``logging.Logger`` is a drop-in ``Log`` (tests use one).
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
# syslog priorities, as journald files them.
_PRIORITY = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3}


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
        from systemd._daemon import notify  # what systemd.daemon.notify is
    except ImportError:
        try:
            from systemd.daemon import notify
        except ImportError:
            return None
    send: Sender = notify
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


def make_notifier(log: Log | None = None) -> Notifier:
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
    (log or Log(WARNING)).warning(
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


def _journal_sender() -> JournalSender | None:
    try:
        from systemd._journal import sendv  # what systemd.journal.send ends in
    except ImportError:
        try:
            from systemd.journal import sendv
        except ImportError:
            return None
    send: JournalSender = sendv
    return send


class Log:
    """The agent's log: journald with structured fields under systemd, else stderr.

    Called like a ``logging.Logger``: ``log.info("wrote %s", line, extra={"KEY": "value"})``;
    the ``extra`` fields become journal fields (``LXD_AGENT_PORT``, ``LXD_AGENT_STATE``).
    """

    def __init__(self, level: int = INFO, journal: JournalSender | None = None) -> None:
        self.level = level
        self._journal = journal

    @classmethod
    def for_environment(cls, level: int = INFO) -> Log:
        """Journald when systemd started us (and systemd-python is there), else stderr."""
        under_systemd = os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID")
        return cls(level, _journal_sender() if under_systemd else None)

    @property
    def backend(self) -> str:
        return "journald" if self._journal is not None else "stderr"

    def log(
        self, level: int, message: str, *args: object, extra: Mapping[str, str] | None = None
    ) -> None:
        if level < self.level:
            return
        text = message % args if args else message
        if self._journal is None:
            sys.stderr.write(f"{LOGGER_NAME}: {text}\n")
            sys.stderr.flush()
            return
        fields = [f"{key}={value}" for key, value in (extra or {}).items()]
        try:
            self._journal(
                "MESSAGE=" + text,
                f"PRIORITY={_PRIORITY[level]}",
                "SYSLOG_IDENTIFIER=" + LOGGER_NAME,
                *fields,
            )
        except OSError as e:
            # journald gone (late in shutdown): the line still reaches stderr, which systemd keeps.
            sys.stderr.write(f"{LOGGER_NAME}: {text} (journald: {e.strerror})\n")

    def debug(self, message: str, *args: object, extra: Mapping[str, str] | None = None) -> None:
        self.log(DEBUG, message, *args, extra=extra)

    def info(self, message: str, *args: object, extra: Mapping[str, str] | None = None) -> None:
        self.log(INFO, message, *args, extra=extra)

    def warning(self, message: str, *args: object, extra: Mapping[str, str] | None = None) -> None:
        self.log(WARNING, message, *args, extra=extra)

    def error(self, message: str, *args: object, extra: Mapping[str, str] | None = None) -> None:
        self.log(ERROR, message, *args, extra=extra)
