"""Supervision of the sensors placed on this worker: one child process each, restarted with
backoff, stopped with SIGTERM then SIGKILL, their output to the journal line by line. No SQL,
no threads: the service's one loop waits on the children's pipes (fds()) beside its signal pipe
and calls poll() (docs/design.md, "Running sensors").

Each child runs in a process group of its own (so stopping it reaches what it started), dies
with the daemon (PR_SET_PDEATHSIG, for a daemon killed with SIGKILL outside systemd; under
systemd the cgroup does it), and never inherits the daemon's secrets or its notify socket
(launch.environment).
"""

import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .. import logs
from . import leftovers
from .launch import LaunchRefused

log = logs.get("runner")

BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0
BACKOFF_RESET_AFTER = 60.0  # a run this long resets the failure count
LINE_LIMIT = 8 * 1024  # longer lines are cut, the rest of the line dropped
READ_CHUNK = 64 * 1024  # per pipe per poll(): a flooding sensor cannot hold the loop
READ_BUDGET = 512 * 1024  # per poll() over all pipes
STDERR_EXCERPT = 4 * 1024
STARTS_PER_POLL = 16  # a start costs ~10 ms: hundreds at once must not hold the loop past a heartbeat
PR_SET_PDEATHSIG = 1

_libc = None


def _die_with(parent):
    """preexec_fn: SIGKILL when the daemon dies; a daemon already gone means exit now."""
    global _libc
    if _libc is None:
        import ctypes  # only once a sensor starts: a daemon running none does not carry it

        _libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls it
    libc = _libc

    def preexec():
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass(frozen=True)
class SensorSpec:
    """One sensor placed here, as the service read it. `startable` is False while a planned move
    waits for the previous worker to stop it (docs/design.md, "At most one copy")."""
    ref: str
    runtime: str
    entrypoint: str = None
    env: dict = field(default_factory=dict, compare=True, hash=False)
    sensor_id: int = None
    triggers: str = "[]"
    startable: bool = True
    waiting_for: str = ""

    def launch_key(self):
        """What, when it changes, needs a restart (not the handover flags)."""
        return (self.runtime, self.entrypoint, tuple(sorted(self.env.items())), self.sensor_id, self.triggers)


class _Stream:
    """One pipe of a child: partial line buffered, lines cut at LINE_LIMIT."""

    def __init__(self, fd, name):
        self.fd = fd
        self.name = name
        self.buffer = bytearray()
        self.dropping = False  # the rest of a line that was cut

    def feed(self, data):
        lines = []
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > LINE_LIMIT:
                    if not self.dropping:
                        lines.append(bytes(self.buffer[:LINE_LIMIT]) + b" [line cut at 8 KiB]")
                    self.dropping = True
                    del self.buffer[:]
                return lines
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            if self.dropping:
                self.dropping = False
                continue
            if len(line) > LINE_LIMIT:
                line = line[:LINE_LIMIT] + b" [line cut at 8 KiB]"
            lines.append(line)

    def rest(self):
        rest, self.buffer = bytes(self.buffer), bytearray()
        return [rest] if rest and not self.dropping else []


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _text(line):
    """A line of a sensor's output as the journal and its stderr excerpt carry it (the excerpt
    reaches `check` and the database without passing the log formatter)."""
    return logs.without_controls(line.decode("utf-8", "replace").rstrip("\r"))


class _Child:
    def __init__(self, spec):
        self.spec = spec
        self.pending = None  # a changed spec to start once this process has exited
        self.state = "starting"
        self.proc = None
        self.streams = []
        self.started_at = None
        self.failures = 0
        self.last_exit_code = None
        self.last_signal = None
        self.restart_at = 0.0  # monotonic
        self.kill_at = None  # monotonic, while stopping
        self.detail = ""
        self.stderr_tail = deque()
        self.stderr_bytes = 0
        self.release = False  # forget once stopped
        self.refused = None  # the last launch refusal logged

    @property
    def alive(self):
        return self.proc is not None

    def excerpt(self):
        return "\n".join(self.stderr_tail)


class Supervisor:
    """`launcher(spec) -> (argv, env, cwd)` may raise LaunchRefused. Times are on `clock`."""

    def __init__(self, launcher, max_running=10, sensor_timeout=30.0, clock=time.monotonic, marks=None):
        self.launcher = launcher
        # (worker, instance): the environment marks of this daemon's sensors (leftovers.py), to
        # find what a sensor started outside its process group; None: its group only
        self.marks = marks
        self.max_running = max_running
        self.sensor_timeout = sensor_timeout
        self.clock = clock
        self.children = {}  # ref -> _Child
        self._by_fd = {}  # fd -> (_Child, _Stream)
        self.released = []  # refs stopped and forgotten since the last take_released()
        self._sigchld_installed = False

    # --- what the service says ------------------------------------------------------------

    def set_desired(self, specs, kill_by=None):
        """`specs`: {ref: SensorSpec}, every sensor this worker runs from now on. Others are
        stopped (SIGKILL after sensor_timeout, or at `kill_by` if sooner) and forgotten."""
        now = self.clock()
        for ref, child in list(self.children.items()):
            if ref not in specs:
                child.release = True
                child.pending = None
                self._stop(child, now, kill_by)
        for ref, spec in specs.items():
            child = self.children.get(ref)
            if child is None:
                self.children[ref] = _Child(spec)
                continue
            child.release = False
            current = child.pending or child.spec
            if current.launch_key() != spec.launch_key():
                if child.alive:
                    child.pending = spec
                    self._stop(child, now, kill_by)
                    continue
                child.spec, child.pending = spec, None
                child.state, child.restart_at, child.detail = "starting", 0.0, ""
            elif child.pending:
                child.pending = spec
            else:
                child.spec = spec
            if child.state == "failed" and not child.alive:
                child.state = "starting"  # a refused launch is tried again at each read
        self.poll()

    def restart_all(self):
        """Every running sensor stops and starts again with what the launcher says now (a
        reload changed where scripts live or which interpreter runs them)."""
        now = self.clock()
        for child in self.children.values():
            if child.alive and not child.release:
                self._restart(child, now)
            elif child.state == "failed":
                child.state, child.refused = "starting", None

    def stop_all(self, kill_by=None):
        self.set_desired({}, kill_by)

    def wait_stopped(self, deadline, wait):
        """Blocks (through `wait(seconds, fds)`) until every child has exited, SIGKILLing at
        each one's kill time; `deadline` bounds it. True when none is left."""
        while any(child.alive for child in self.children.values()):
            now = self.clock()
            if now >= deadline:
                for child in self.children.values():
                    if child.alive:
                        self._signal(child, signal.SIGKILL)
                        child.proc.wait()
                        self._exited(child, now)
                break
            wait(min(0.2, deadline - now, max(0.0, self.next_due() - now)), self.fds())
            self.poll()
        self.children = {ref: c for ref, c in self.children.items() if c.alive}
        return not self.children

    # --- the loop's side ------------------------------------------------------------------

    def fds(self):
        return list(self._by_fd)

    def next_due(self):
        """The next time poll() has something to do without any pipe becoming readable."""
        due = [c.kill_at for c in self.children.values() if c.alive and c.kill_at is not None]
        due += [c.restart_at for c in self.children.values() if not c.alive and c.state in ("backoff", "starting")]
        if not self._sigchld_installed and any(c.alive for c in self.children.values()):
            due.append(self.clock() + 1.0)  # no SIGCHLD to wake the loop (not the main thread): look each second
        return min(due) if due else float("inf")

    def poll(self, ready=None):
        """Reads output (of the `ready` pipes, or of all), reaps exits, escalates stops, starts
        what is due. Bounded work."""
        budget = READ_BUDGET
        for fd in list(ready if ready is not None else self._by_fd):
            if fd in self._by_fd and budget > 0:
                budget -= self._read(fd)
        now = self.clock()
        for child in list(self.children.values()):
            if child.alive and child.proc.poll() is not None:
                self._exited(child, now)
            elif child.alive and child.kill_at is not None and now >= child.kill_at:
                self._signal(child, signal.SIGKILL)
                self._signal_marked(child, signal.SIGKILL)
                child.kill_at = None
        for ref, child in list(self.children.items()):
            if child.release and not child.alive:
                del self.children[ref]
                self.released.append(ref)
        self._start_due(now)

    def take_released(self):
        released, self.released = self.released, []
        return released

    def held(self):
        """Refs this worker may still be running: placed here, or stopping."""
        return sorted(self.children)

    def states(self):
        """{ref: {status, pid, consecutive_failures, last_exit_code, last_signal,
        restart_in, detail}} in the platform's sensor_process vocabulary."""
        now = self.clock()
        shown = {}
        for ref, child in sorted(self.children.items()):
            if child.release and not child.alive:
                continue  # stopped: gone with the next poll
            # a released sensor still stopping is reported as such: `place` elsewhere waits for it
            shown[ref] = {
                "status": child.state, "pid": child.proc.pid if child.alive else None,
                "consecutive_failures": child.failures, "last_exit_code": child.last_exit_code,
                "last_signal": child.last_signal,
                "restart_in": round(max(0.0, child.restart_at - now), 1) if child.state == "backoff" else None,
                "detail": (child.detail or child.excerpt())[-STDERR_EXCERPT:] or None,
            }
        return shown

    def counts(self):
        """(running processes, sensors monitored)."""
        return (sum(1 for c in self.children.values() if c.alive and not c.release),
                sum(1 for c in self.children.values() if not c.release))

    # --- inside ---------------------------------------------------------------------------

    def _start_due(self, now):
        running = sorted(ref for ref, c in self.children.items() if c.alive and c.state != "stopping")
        for ref in running[self.max_running:]:  # max_concurrent_sensors lowered: the last refs wait
            child = self.children[ref]
            log.warning("sensor %s stops: more than max_concurrent_sensors (%d) run here", ref, self.max_running,
                        extra={"sensor_ref": ref})
            self._restart(child, now)
        alive = sum(1 for c in self.children.values() if c.alive)
        started = 0
        for ref, child in sorted(self.children.items()):
            if child.alive or child.release or child.state == "failed":
                continue
            if not child.spec.startable:
                child.state = "waiting"
                child.detail = child.spec.waiting_for or "waiting for the previous worker to stop it"
                continue
            if child.state == "backoff" and now < child.restart_at:
                continue
            if alive >= self.max_running:
                if child.state != "waiting" or "max_concurrent_sensors" not in child.detail:
                    log.warning("sensor %s waits: %d sensor processes run here already (max_concurrent_sensors)",
                                ref, alive, extra={"sensor_ref": ref})
                child.state, child.detail = "waiting", f"max_concurrent_sensors ({self.max_running}) reached"
                continue
            if started >= STARTS_PER_POLL:
                break  # the rest at the next turn of the loop (next_due says now)
            if self._start(child, now):
                alive += 1
                started += 1

    def _start(self, child, now):
        spec = child.spec
        try:
            argv, env, cwd = self.launcher(spec)
            self._install_sigchld()
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
                                    preexec_fn=_die_with(os.getpid()))
        except (LaunchRefused, OSError, subprocess.SubprocessError) as exc:
            reason = str(exc) if isinstance(exc, LaunchRefused) else f"cannot start: {getattr(exc, 'strerror', None) or exc}"
            reason = reason[:1000]
            if reason != child.refused:  # said once, not at every read that tries again
                log.error("sensor %s failed: %s", spec.ref, reason, extra={"sensor_ref": spec.ref})
            child.state, child.detail, child.refused = "failed", reason, reason
            return False
        child.proc, child.started_at, child.kill_at = proc, now, None
        child.state, child.detail, child.refused = "running", "", None
        child.streams = []
        for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            stream = _Stream(fd, name)
            child.streams.append((pipe, stream))
            self._by_fd[fd] = (child, stream)
        log.info("sensor %s started (pid %d): %s", spec.ref, proc.pid, " ".join(argv), extra={"sensor_ref": spec.ref})
        return True

    def _restart(self, child, now):
        """Stops a running child; once it has exited it starts again (its pending spec, or the same)."""
        child.pending = child.pending or child.spec
        self._stop(child, now, None)

    def _stop(self, child, now, kill_by):
        if not child.alive:
            child.state = "stopping" if child.release else child.state
            return
        kill_at = now + self.sensor_timeout
        if kill_by is not None:
            kill_at = min(kill_at, kill_by)
        if child.state != "stopping":
            log.info("sensor %s stopping (pid %d): SIGTERM, SIGKILL in %.1fs", child.spec.ref, child.proc.pid,
                     max(0.0, kill_at - now), extra={"sensor_ref": child.spec.ref})
            child.state = "stopping"
            self._signal(child, signal.SIGTERM)
            self._signal_marked(child, signal.SIGTERM)
        child.kill_at = kill_at if child.kill_at is None else min(child.kill_at, kill_at)

    def _signal(self, child, signum):
        try:
            os.killpg(child.proc.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                child.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def _signal_marked(self, child, signum):
        """What the sensor started outside its process group, found by its environment marks."""
        if self.marks is not None:
            worker, instance = self.marks
            leftovers.signal_all([pid for pid in leftovers.find(worker, instance, ref=child.spec.ref)
                                  if pid != child.proc.pid], signum)

    def _read(self, fd):
        child, stream = self._by_fd[fd]
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""  # a pipe that failed is closed as at its end
        if not data:
            self._close(child, stream)
            return 0
        for line in stream.feed(data):
            self._emit(child, stream, line)
        return len(data)

    def _emit(self, child, stream, line):
        text = _text(line)
        ref = child.spec.ref
        if stream.name == "stderr":
            child.stderr_tail.append(text)
            child.stderr_bytes += len(text) + 1
            while child.stderr_bytes > STDERR_EXCERPT and len(child.stderr_tail) > 1:
                child.stderr_bytes -= len(child.stderr_tail.popleft()) + 1
        log.info("sensor %s%s: %s", ref, " (stderr)" if stream.name == "stderr" else "", text,
                 extra={"sensor_ref": ref, "stream": stream.name})

    def _close(self, child, stream):
        for line in stream.rest():
            self._emit(child, stream, line)
        self._by_fd.pop(stream.fd, None)
        for pipe, known in child.streams:
            if known is stream:
                pipe.close()
        child.streams = [(p, s) for p, s in child.streams if s is not stream]

    def _exited(self, child, now):
        proc = child.proc
        # drain what is left in the pipes, then close them
        for pipe, stream in list(child.streams):
            for _ in range(4):
                if stream.fd not in self._by_fd or not self._read(stream.fd):
                    break
            if stream.fd in self._by_fd:
                self._close(child, stream)
        self._signal(child, signal.SIGKILL)  # what it started and left behind, in its group
        self._signal_marked(child, signal.SIGKILL)  # and outside it
        code = proc.returncode
        ran = now - (child.started_at or now)
        child.proc, child.kill_at = None, None
        child.last_exit_code = code if code >= 0 else None
        child.last_signal = -code if code < 0 else None
        name = _signal_name(-code) if code < 0 else ""
        how = f"was killed by signal {name}" if code < 0 else f"exited with code {code}"
        ref = child.spec.ref
        if child.release or child.pending:
            log.info("sensor %s stopped (%s)", ref, f"signal {name}" if code < 0 else f"code {code}",
                     extra={"sensor_ref": ref})
            if child.pending and not child.release:
                child.spec, child.pending = child.pending, None
                child.state, child.restart_at, child.failures = "starting", 0.0, 0
            else:
                child.state = "stopping"
            return
        if ran >= BACKOFF_RESET_AFTER:
            child.failures = 0
        child.failures += 1
        delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (child.failures - 1))
        child.state, child.restart_at = "backoff", now + delay
        log.warning("sensor %s %s after %.1fs; restarting in %gs (failure %d in a row)", ref, how, ran, delay,
                    child.failures, extra={"sensor_ref": ref})

    def _install_sigchld(self):
        """A Python handler for SIGCHLD makes the signal write to the wakeup fd the service's
        loop waits on (signals.py), so an exit is seen at once, not at the next second."""
        if self._sigchld_installed or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._sigchld_installed = True
