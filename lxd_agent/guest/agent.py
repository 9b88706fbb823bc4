"""The agent's daemon loop: find the port, report STARTED and keep it fresh, report STOPPED.

Runs in the guest. Signals are taken synchronously with ``sigtimedwait`` (blocked, never
handled asynchronously), so a stop request can never interrupt a write half-way and every
wait in the loop has a bound.

On the path from exec to READY=1 at every boot, so it imports only what that path needs:
``_signal`` (the C half of ``signal``, which would load ``enum``), no ``logging``, ``typing`` or
``dataclasses`` at run time (see ``notify`` and ``ports``).
"""

from __future__ import annotations

import os
import time

from lxd_agent.guest.notify import Log, Notifier, make_notifier, watchdog_interval
from lxd_agent.guest.ports import (
    Candidate,
    PortError,
    PortRoots,
    Record,
    describe_all,
    find_connected_port,
    write_line,
)
from lxd_agent.protocol import (
    CANDIDATE_PORT_NAMES,
    DEFAULT_REFRESH_SECONDS,
    MINIMAL_STATE_LINE,
    STARTED,
    STATE_PORT_NAMES,
    STOPPED,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from typing import Callable, Mapping, Protocol, Sequence

    class Logger(Protocol):
        """What the agent logs through: a ``notify.Log``, or a ``logging.Logger`` in tests."""

        def debug(self, msg: str, *args: object, extra: Mapping[str, str] | None = ...) -> None: ...
        def info(self, msg: str, *args: object, extra: Mapping[str, str] | None = ...) -> None: ...
        def warning(
            self, msg: str, *args: object, extra: Mapping[str, str] | None = ...
        ) -> None: ...
        def error(self, msg: str, *args: object, extra: Mapping[str, str] | None = ...) -> None: ...

else:
    import _signal

EXIT_OK = 0
EXIT_NO_PORT = 1
# Stopped, but STOPPED could not be written: the host may still believe the agent is up.
# Not 0, so that the stop shows as failed; the unit's ExecStopPost= tries once more.
EXIT_STOPPED_UNREPORTED = 3

_STOP_SIGNALS = frozenset({_signal.SIGTERM, _signal.SIGINT})
_SIGNALS = _STOP_SIGNALS | {_signal.SIGHUP}

# How often to look for a port that is not there yet; after losing one, back off to the max.
_SCAN_INTERVAL = 0.5
_MAX_SCAN_INTERVAL = 5.0


DEFAULT_WAIT_SECONDS = 30.0

STATE_LINE_CHOICES = ("auto", "on", "off")
"""`AgentConfig.state_line`: auto asks `state.state_switch` (the host's credential, the image's
file) at the first write to a port in `STATE_PORT_NAMES`; on and off say it outright."""


class AgentConfig(Record):
    """How one run behaves; the unit's is ``AgentConfig(skip_without_port=True)``."""

    __slots__ = (
        "names",
        "refresh",
        "roots",
        "skip_without_port",
        "state_line",
        "wait",
        "write_timeout",
    )

    def __init__(
        self,
        refresh: float = DEFAULT_REFRESH_SECONDS,
        wait: float = DEFAULT_WAIT_SECONDS,
        write_timeout: float = 2.0,
        roots: PortRoots | None = None,
        names: Sequence[str] = CANDIDATE_PORT_NAMES,
        skip_without_port: bool = False,
        state_line: str = "auto",
    ) -> None:
        self.refresh = refresh
        """Seconds between STARTED rewrites; 0 writes it once."""
        self.wait = wait
        """Seconds to wait at start for a usable port before giving up."""
        self.write_timeout = write_timeout
        self.roots = roots if roots is not None else PortRoots()
        self.names = tuple(names)
        self.skip_without_port = skip_without_port
        """No usable port at the first look: tell systemd it is done and exit 0, not wait."""
        self.state_line = state_line
        """Whether STARTED on Incus's port carries the guest's state (`STATE_LINE_CHOICES`)."""


def describe_port(port: Candidate) -> str:
    legacy = ", legacy fallback" if port.legacy else ""
    return f"{port.name} ({port.device}{legacy})"


class Agent:
    """One run of the agent. ``run()`` owns the process's SIGTERM, SIGINT and SIGHUP."""

    def __init__(
        self,
        config: AgentConfig,
        notifier: Notifier,
        log: Logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.notifier = notifier
        self.log = log
        self.clock = clock
        self.port: Candidate | None = None
        self._watchdog = watchdog_interval()
        self._last_ping = clock()
        # Why no port takes our lines now: logged only when it changes, so a port that keeps
        # failing does not flood the journal, and kept for the error when we give up.
        self._problem = ""
        # The port last written to, so that "reporting to" is logged once, after it worked.
        self._reported: tuple[str, str | None] | None = None
        # The state line: decided at the first write to a state port; the first one written
        # is MINIMAL_STATE_LINE and the full state follows at once (`_state_for`).
        self._state_on: bool | None = None
        self._full_state_due = False
        self._state_problem = ""

    def run(self) -> int:
        # Blocked for good, not restored: a late SIGTERM must not kill us while writing STOPPED.
        _signal.pthread_sigmask(_signal.SIG_BLOCK, _SIGNALS)
        self.log.debug("systemd notifications: %s", self.notifier.backend)
        if self.config.skip_without_port:
            self.port, seen = find_connected_port(self.config.names, self.config.roots)
            # Only a definite "nothing to report to" skips (no such port, or one the host has
            # nothing behind): a port caught in a moment of its setup (busy, udev's link being
            # replaced) is waited for like any late port, up to --wait.
            if self.port is None and all(candidate.settled for candidate in seen):
                return self._skip(describe_all(seen))
        if not self._report_loop():
            return EXIT_NO_PORT
        return EXIT_OK if self._stop() else EXIT_STOPPED_UNREPORTED

    def _skip(self, problem: str) -> int:
        """Nothing to report to (only ports with nothing behind them): done, neither failed
        nor waiting.

        READY=1 first: a Type=notify unit whose process exits 0 without it counts as failed
        (Result=protocol). The unit then goes inactive with Result=success, and
        Restart=on-failure leaves it be. udev starts it again if an LXD port appears later.
        """
        self.log.info(
            "no usable port, nothing to report to: %s; exiting (a port that appears later "
            "starts the agent again)",
            problem,
        )
        self.notifier.notify("READY=1", "STATUS=skipped, no usable port: " + problem)
        return EXIT_OK

    def _report_loop(self) -> bool:
        """Report STARTED until a stop signal; False when no port showed up in time."""
        started_at = self.clock()
        ready = False
        scan_interval = _SCAN_INTERVAL
        while True:
            if self.port is None:
                self.port = self._find()
            if self.port is not None and self._write(STARTED):
                scan_interval = _SCAN_INTERVAL
                if not ready:
                    # Only now: READY=1 promises that the host can already read STARTED.
                    self.notifier.notify("READY=1")
                    ready = True
                # A first state line that was only the minimal one: the full one goes now.
                delay = 0.0 if self._full_state_due else self.config.refresh or None
            else:
                self.port = None
                if not ready and self.clock() - started_at >= self.config.wait:
                    self.log.error(
                        "no usable port after %g s: %s; check the VM's virtio-serial "
                        "devices with 'lxd-agent probe'",
                        self.config.wait,
                        self._problem,
                    )
                    self.notifier.notify("STATUS=no usable port: " + self._problem)
                    return False
                delay = scan_interval
                if ready:
                    # Lost a port we had: back off so a long hot-unplug costs nothing.
                    scan_interval = min(scan_interval * 2, _MAX_SCAN_INTERVAL)

            signo = self._sleep(delay)
            if signo in _STOP_SIGNALS:
                return True
            if signo == _signal.SIGHUP:
                self.log.info("SIGHUP: looking for the port again")
                self.port = None

    def _find(self) -> Candidate | None:
        port, seen = find_connected_port(self.config.names, self.config.roots)
        if port is None:
            problem = describe_all(seen)
            if problem != self._problem:
                self.log.info("waiting for a port: %s", problem)
                self.notifier.notify("STATUS=waiting for a port: " + problem)
            self._problem = problem
        return port

    def _state_for(self, port: Candidate) -> str | None:
        """The state line to follow STARTED on ``port`` with, or None for none."""
        if port.name not in STATE_PORT_NAMES or self.config.state_line == "off":
            return None
        if self._state_on is None:
            if self.config.state_line == "on":
                self._state_on, why = True, "on (--state-line=on)"
            else:
                from lxd_agent.guest.state import state_switch

                directory = os.environ.get("CREDENTIALS_DIRECTORY")
                self._state_on, why = state_switch(credentials_directory=directory)
            self.log.info("state line after %s on %s: %s", STARTED, port.name, why)
            if self._state_on:
                self._full_state_due = True
                return MINIMAL_STATE_LINE
        if not self._state_on:
            return None
        self._full_state_due = False
        try:
            from lxd_agent.guest.state import guest_state, state_line

            return state_line(guest_state())
        except Exception as e:  # the status goes out whatever the state's sources do
            problem = f"{type(e).__name__}: {e}"
            if problem != self._state_problem:
                self.log.warning("could not gather the state, writing the minimal one: %s", problem)
            self._state_problem = problem
            return MINIMAL_STATE_LINE

    def _write(self, line: str) -> bool:
        port = self.port
        assert port is not None and port.device is not None
        state = self._state_for(port) if line == STARTED else None
        try:
            write_line(port.device, line, self.config.write_timeout, port.copies, state)
        except PortError as e:
            # A port can look usable and still refuse the write (ENOSPC, EIO): keep why.
            problem = f"{port.name}: {e}"
            if problem != self._problem:
                self.log.warning(
                    "could not write %s: %s; looking for a port again",
                    line,
                    e,
                    extra={"LXD_AGENT_STATE": line, "LXD_AGENT_PORT": port.name},
                )
            self._problem = problem
            self._reported = None
            return False
        self._problem = ""
        if (port.name, port.device) != self._reported:
            self._reported = (port.name, port.device)
            self.log.info(
                "reporting to %s",
                describe_port(port),
                extra={"LXD_AGENT_PORT": port.name, "LXD_AGENT_DEVICE": port.device},
            )
            self.notifier.notify("STATUS=reporting to " + describe_port(port))
        self.log.debug("wrote %s", line, extra={"LXD_AGENT_STATE": line})
        return True

    def _stop(self) -> bool:
        """Write STOPPED; when it cannot get out, say so and return False."""
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        port, problem = self.port, ""
        if port is None:
            # Lost it (or never had one): one last look, so STOPPED still gets out.
            port, seen = find_connected_port(self.config.names, self.config.roots)
            problem = describe_all(seen)
        if port is not None and port.device is not None:
            try:
                write_line(port.device, STOPPED, self.config.write_timeout, port.copies)
            except PortError as e:
                problem = f"{port.name}: {e}"
            else:
                self.log.info("reported %s", STOPPED, extra={"LXD_AGENT_STATE": STOPPED})
                return True
        self.log.error(
            "could not write %s: %s; exiting with status %d (the unit's ExecStopPost= "
            "tries once more; check the port with 'lxd-agent probe')",
            STOPPED,
            problem,
            EXIT_STOPPED_UNREPORTED,
            extra={"LXD_AGENT_STATE": STOPPED},
        )
        self.notifier.notify(f"STATUS=stopped without writing {STOPPED}: {problem}")
        return False

    def _sleep(self, seconds: float | None) -> int | None:
        """Wait ``seconds`` (None: until a signal), pinging the watchdog; return the signal."""
        end = None if seconds is None else self.clock() + seconds
        while True:
            now = self.clock()
            deadlines = [end] if end is not None else []
            if self._watchdog is not None:
                ping_at = self._last_ping + self._watchdog
                if now >= ping_at:
                    self.notifier.notify("WATCHDOG=1")
                    self._last_ping = now
                    ping_at = now + self._watchdog
                deadlines.append(ping_at)
            if end is not None and now >= end:
                return None
            if not deadlines:
                return int(_signal.sigwaitinfo(_SIGNALS).si_signo)
            info = _signal.sigtimedwait(_SIGNALS, max(min(deadlines) - now, 0.001))
            if info is not None:
                return int(info.si_signo)


def run(config: AgentConfig, level: int | None = None) -> int:
    """The daemon, as ``lxd-agent run`` starts it: journald (or stderr), sd_notify, the loop."""
    log = Log.for_environment() if level is None else Log.for_environment(level)
    return Agent(config, make_notifier(log), log).run()
