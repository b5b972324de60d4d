"""Which runtimes this host offers sensors: ATTUNE_SENSOR_RUNTIMES > config > probing binaries.

Detection runs each candidate with --version, the way the spec's reference implementation does,
so a broken interpreter on PATH is not reported as available.
"""

import os
import re
import shutil
import subprocess
import tempfile
import time

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


def _start(binary, environ, child_env):
    path = shutil.which(binary, path=environ.get("PATH", os.defpath))
    if not path:
        return None
    # A file, not a pipe: a binary that prints without end cannot fill our memory, and every
    # probe runs at once without a reader each. Only the first VERSION_BYTES are read.
    output = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen([path, "--version"], stdin=subprocess.DEVNULL, stdout=output,
                                stderr=subprocess.STDOUT, env=child_env)
    except OSError:
        output.close()
        return None
    return path, proc, output


def _version(output):
    output.seek(0)
    text = output.read(VERSION_BYTES).decode("utf-8", "replace")
    match = VERSION_RE.search(text)
    return match.group(1) if match else None


def _finish(started, deadline):
    """An Interpreter when the probe exited 0 in time, else None; the process is gone after."""
    if started is None:
        return None
    path, proc, output = started
    try:
        code = proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        return (path, _version(output)) if code == 0 else None
    finally:
        output.close()


def probe(environ=None):
    """Runs every candidate at once (start-up time is what an operator waits for), then keeps
    each candidate that exited 0 within PROBE_TIMEOUT. Returns (runtime names, interpreters)
    where each interpreter is {name, path, version} as the platform reports it."""
    environ = os.environ if environ is None else environ
    child_env = _child_environment(environ)
    started = [(name, [_start(b, environ, child_env) for b in binaries]) for name, binaries in PROBES]
    deadline = time.monotonic() + PROBE_TIMEOUT
    names, interpreters = [], []
    for name, candidates in started:
        for path, version in filter(None, [_finish(c, deadline) for c in candidates]):
            if any(i["path"] == path for i in interpreters):
                continue  # python and python3 may be one file
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
