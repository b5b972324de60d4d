"""Which runtimes this host offers sensors: ATTUNE_SENSOR_RUNTIMES > config > probing binaries.

Detection runs each candidate with --version, the way the spec's reference implementation does,
so a broken interpreter on PATH is not reported as available.
"""

import os
import re
import selectors
import signal
import subprocess
import time

from ..runner import launch

ENV_VAR = "ATTUNE_SENSOR_RUNTIMES"
RUNTIME_RE = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,31}$")
PROBE_TIMEOUT = 5  # seconds; a hung interpreter must not hold up start-up for long

# runtime name -> binaries to try, first success wins
PROBES = (("python", ("python3", "python")), ("node", ("node",)))
ALWAYS = ("shell", "native")
VERSION_RE = re.compile(r"(\d+(?:\.\d+){1,3})")
VERSION_BYTES = 4096


def normalise(names):
    """Trimmed, lower-case, no empties, no duplicates, order kept. ValueError names a bad one."""
    result = []
    for raw in names:
        if not isinstance(raw, str):
            raise ValueError(f"runtime names must be strings, got {raw!r}")
        name = raw.strip().lower()
        if not name:
            continue
        if not RUNTIME_RE.fullmatch(name):
            shown = repr(name) if len(name) <= 40 else repr(name[:37]) + "..."
            raise ValueError(f"invalid runtime name {shown} (letters, digits, _ . + -, at most 32)")
        if name not in result:
            result.append(name)
    return result


def _child_environment(environ):
    # A child must never talk to systemd on our behalf (docs/design.md, "Readiness").
    return {k: v for k, v in environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}


class _Probe:
    """One `BINARY --version` running, its output on a pipe we read without blocking. A probe
    that prints more than VERSION_BYTES is killed: what it can write is bounded by that and
    the pipe's buffer, wherever it is pointed (a temporary file once took 8 GB in 5 s)."""

    def __init__(self, path, proc):
        self.path, self.proc = path, proc
        self.output = bytearray()
        self.reading = True
        self.too_long = False
        os.set_blocking(proc.stdout.fileno(), False)

    def fileno(self):
        return self.proc.stdout.fileno()

    def read(self):
        try:
            data = os.read(self.fileno(), VERSION_BYTES + 1 - len(self.output))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.output += data
        if not data or len(self.output) > VERSION_BYTES:
            self.reading = False
            self.too_long = len(self.output) > VERSION_BYTES
            if self.too_long:
                self._kill()  # now, not at the deadline: nothing reads its pipe any more

    def finish(self, deadline):
        """(path, version) when it exited 0 in time without printing too much, else None;
        the process is gone after."""
        try:
            code = None if self.too_long else self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            self._kill()
            self.proc.wait()
        self.proc.stdout.close()
        if code != 0:
            return None
        match = VERSION_RE.search(self.output.decode("utf-8", "replace"))
        return self.path, match.group(1) if match else None

    def _kill(self):
        # its own process group (start_new_session), so what it started goes too; the leader is
        # not reaped yet, so the group id is still its own
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _identity(path):
    """Which file a path is: python and python3 are often one file (a symlink or a hardlink)."""
    try:
        found = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return found.st_dev, found.st_ino


def _start(path, child_env):
    try:
        proc = subprocess.Popen([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    except OSError:
        return None
    return _Probe(path, proc)


def _read_all(probes, deadline):
    """Reads every probe's output until each has ended it (or printed too much), or the deadline."""
    with selectors.DefaultSelector() as selector:
        for probe_ in probes:
            selector.register(probe_, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for key, _events in selector.select(remaining):
                key.fileobj.read()
                if not key.fileobj.reading:
                    selector.unregister(key.fileobj)


def probe(environ=None):
    """Runs every candidate at once (start-up time is what an operator waits for), then keeps
    each candidate that exited 0 within PROBE_TIMEOUT. Returns (runtime names, interpreters)
    where each interpreter is {name, path, version} as the platform reports it; one file found
    under two names (python3, python) is probed and reported once, by its first name."""
    environ = os.environ if environ is None else environ
    child_env = _child_environment(environ)
    search = environ.get("PATH", os.defpath)
    seen, started = set(), []
    for name, binaries in PROBES:
        for binary in binaries:
            path = launch.which(binary, search)
            if path and _identity(path) not in seen:
                seen.add(_identity(path))
                started.append((name, _start(path, child_env)))
    deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        _read_all([p for _name, p in started if p], deadline)
    except BaseException:
        deadline = 0.0  # interrupted: no probe outlives this call, none is waited for
        raise
    finally:
        results = [(name, p.finish(deadline)) for name, p in started if p]
    names, interpreters = [], []
    for name, result in results:
        if result:
            path, version = result
            interpreters.append({"name": name, "path": path, "version": version})
            if name not in names:
                names.append(name)
    return names + list(ALWAYS), interpreters


def runtime_versions(interpreters):
    """{runtime: sorted distinct versions}, the platform's `runtime_versions` capability."""
    versions = {}
    for interpreter in interpreters:
        if interpreter["version"]:
            versions.setdefault(interpreter["name"], set()).add(interpreter["version"])
    return {name: sorted(found, key=_version_key) for name, found in sorted(versions.items())}


def _version_key(version):
    return tuple(int(part) for part in version.split("."))


MAX_ENV_CHARS = 4096


def from_environment(environ):
    """The runtimes ATTUNE_SENSOR_RUNTIMES names, normalised ([] when unset or blank). Raises
    ValueError naming the variable for a bad name or a value longer than MAX_ENV_CHARS."""
    raw = environ.get(ENV_VAR, "")
    if len(raw) > MAX_ENV_CHARS:
        raise ValueError(f"{ENV_VAR}: is longer than {MAX_ENV_CHARS} characters")
    try:
        return normalise(raw.split(","))
    except ValueError as exc:
        raise ValueError(f"{ENV_VAR}: {exc}") from None


def resolve(config_runtimes, environ=None):
    """Returns (runtimes, source, interpreters) where source is 'environment', 'config' or
    'detected'; interpreters (from probing) is empty unless detected.

    Raises ValueError naming ATTUNE_SENSOR_RUNTIMES when the variable holds a bad name; a
    variable that is set but empty counts as unset.
    """
    environ = os.environ if environ is None else environ
    names = from_environment(environ)
    if names:
        return names, "environment", []
    if config_runtimes:
        return list(config_runtimes), "config", []
    names, interpreters = probe(environ)
    return names, "detected", interpreters
