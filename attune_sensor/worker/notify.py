"""The systemd notify protocol (sd_notify(3)): READY, WATCHDOG, WATCHDOG_USEC, STATUS, STOPPING, RELOADING.

Outside systemd (no NOTIFY_SOCKET) every call is a silent no-op, as sdnotify does it.
"""

import os
import time

import sdnotify

from ..errors import ConfigError


def monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_usec(environ=None):
    """systemd's WatchdogSec in microseconds, or None when no watchdog is armed for us."""
    environ = os.environ if environ is None else environ
    value = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not value or (pid and pid != str(os.getpid())):
        return None
    try:
        usec = int(value)
    except ValueError:
        return None
    return usec if usec > 0 else None


# systemd's watchdog follows the heartbeat: the daemon asks for this many intervals
# (WATCHDOG_USEC=, sd_notify(3)), never for less than the unit's WatchdogSec.
WATCHDOG_MULTIPLE = 3


def watchdog_for(interval, environ):
    """The watchdog timeout (microseconds) the daemon asks systemd for with `WATCHDOG_USEC=`:
    WATCHDOG_MULTIPLE x the heartbeat interval, at least the unit's WatchdogSec. None when
    systemd armed no watchdog for this process (WatchdogSec=0 is the operator's choice, kept)."""
    usec = watchdog_usec(environ)
    if usec is None:
        return None
    return max(usec, int(round(WATCHDOG_MULTIPLE * interval * 1_000_000)))


def check_watchdog_fits(interval, environ):
    """ConfigError when heartbeats (and so WATCHDOG=1) would come too rarely for a watchdog the
    daemon cannot move: armed (WATCHDOG_USEC) but with no NOTIFY_SOCKET to send WATCHDOG_USEC= on,
    the interval must fit in half of it. Under systemd the socket is there and the watchdog
    follows the interval instead (watchdog_for; docs/design.md, "Watchdog")."""
    usec = watchdog_usec(environ)
    if usec is None or environ.get("NOTIFY_SOCKET"):
        return
    limit = usec / 2_000_000
    if interval > limit:
        raise ConfigError(
            f"sensor.heartbeat_interval: {interval:g}s does not fit in half of the watchdog's "
            f"WatchdogSec ({usec / 1_000_000:g}s), and without NOTIFY_SOCKET the daemon cannot ask for a longer one. "
            f"Lower the interval to at most {limit:g}s or raise WatchdogSec"
        )


class Notifier:
    def __init__(self):
        self._notifier = sdnotify.SystemdNotifier()
        if self._notifier.socket is not None:
            # A receiver that stops reading must not block the loop: a full queue drops the
            # message (sdnotify swallows the error) instead of stalling heartbeats.
            self._notifier.socket.setblocking(False)

    @property
    def active(self):
        return self._notifier.socket is not None

    def send(self, *fields):
        self._notifier.notify("\n".join(fields))

    def status(self, text):
        self.send(f"STATUS={text}")

    def ready(self, status):
        self.send("READY=1", f"STATUS={status}")

    def watchdog(self):
        self.send("WATCHDOG=1")

    def watchdog_timeout(self, usec):
        """Moves systemd's watchdog to `usec` (needs NotifyAccess=main or all; a restart of the
        unit goes back to its WatchdogSec)."""
        self.send(f"WATCHDOG_USEC={int(usec)}")

    def extend_timeout(self, seconds, status):
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", f"STATUS={status}")

    def reloading(self):
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=Reloading configuration")

    def stopping(self):
        self.send("STOPPING=1", "STATUS=Stopping: deregistering worker")
