"""Signals as flags, and a sleep that they (or stop()/reload() from another thread) cut short.

Handlers only set a flag and write to a pipe (signal.set_wakeup_fd), so the service acts on a
signal between two bounded database calls, never inside one (docs/design.md, "Shutdown").
"""

import os
import select
import signal


def entry_point():
    """The `attune-sensor` console script (setup.cfg). Its first act holds SIGHUP back: this
    module imports little, while the CLI and its configuration code take tens of milliseconds
    to import, and `systemctl reload` may come that early; SIGHUP's default action would end
    the process. cli.main installs its handler and lets the signal through, so one that came
    in between is acted on then, not lost (docs/design.md, "Readiness")."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from ..cli import main

    return main()


class SignalFlags:
    def __init__(self):
        self.stop_requested = False
        self.reload_requested = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def request_stop(self, *_signal):
        self.stop_requested = True
        self._wake()

    def request_reload(self, *_signal):
        self.reload_requested = True
        self._wake()

    def take_reload(self):
        """True once per reload asked for since the last call."""
        asked, self.reload_requested = self.reload_requested, False
        return asked

    def install(self):
        """SIGTERM and SIGINT ask to stop, SIGHUP to reload. Returns what to restore(); outside
        the main thread (embedded use) nothing is installed and the caller uses request_*()."""
        import threading  # here: this module is on the console script's path to blocking SIGHUP

        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, self.request_stop),
            signal.SIGINT: signal.signal(signal.SIGINT, self.request_stop),
            signal.SIGHUP: signal.signal(signal.SIGHUP, self.request_reload),
        }
        previous["wakeup_fd"] = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        return previous

    @staticmethod
    def restore(previous):
        if previous is None:
            return
        signal.set_wakeup_fd(previous.pop("wakeup_fd"))
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def sleep(self, seconds):
        """Sleeps up to `seconds`, returning early when a stop or reload is asked for."""
        if self.stop_requested or self.reload_requested:
            return
        ready, _, _ = select.select([self._wake_r], [], [], seconds)
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def wait(self, seconds, fds=(), flags_end_it=True):
        """sleep() that also ends when one of `fds` (the sensors' pipes) is readable; returns
        those that are. With `flags_end_it` False (stopping: the stop flag is already set) only
        time and fds end it. poll(), not select(): no limit on descriptor numbers."""
        if flags_end_it and (self.stop_requested or self.reload_requested):
            return []
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ready = [fd for fd, _ in poller.poll(max(0.0, seconds) * 1000)]
        if self._wake_r in ready:
            ready.remove(self._wake_r)
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        return ready

    def _wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full: the sleeper is awake anyway
