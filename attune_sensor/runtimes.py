"""Which runtimes this host offers sensors: ATTUNE_SENSOR_RUNTIMES > config > probing binaries.

Detection runs each candidate with --version, the way the spec's reference implementation does,
so a broken interpreter on PATH is not reported as available.
"""

import os
import re
import shutil
import subprocess
import time

ENV_VAR = "ATTUNE_SENSOR_RUNTIMES"
RUNTIME_RE = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,31}$")
PROBE_TIMEOUT = 5  # seconds; a hung interpreter must not hold up start-up for long

# runtime name -> binaries to try, first success wins
PROBES = (("python", ("python3", "python")), ("node", ("node",)))
ALWAYS = ("shell", "native")


def normalise(names):
    """Trimmed, lower-case, no empties, no duplicates, order kept. ValueError names a bad one."""
    result = []
    for raw in names:
        if not isinstance(raw, str):
            raise ValueError(f"runtime names must be strings, got {raw!r}")
        name = raw.strip().lower()
        if not name:
            continue
        if not RUNTIME_RE.match(name):
            shown = repr(name) if len(name) <= 40 else repr(name[:37]) + "..."
            raise ValueError(f"invalid runtime name {shown} (letters, digits, _ . + -, at most 32)")
        if name not in result:
            result.append(name)
    return result


def _child_environment(environ):
    # A child must never talk to systemd on our behalf (DESIGN.md decision 6).
    return {k: v for k, v in environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}


def _start(binary, environ, child_env):
    path = shutil.which(binary, path=environ.get("PATH", os.defpath))
    if not path:
        return None
    try:
        return subprocess.Popen([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=child_env)
    except OSError:
        return None


def _succeeded(proc, deadline):
    if proc is None:
        return False
    try:
        return proc.wait(max(0.0, deadline - time.monotonic())) == 0
    except subprocess.TimeoutExpired:
        return False


def probe(environ=None):
    """Runs every candidate at once (start-up time is what an operator waits for), then keeps
    the runtimes with a candidate that exited 0 within PROBE_TIMEOUT."""
    environ = os.environ if environ is None else environ
    child_env = _child_environment(environ)
    started = [(name, [_start(b, environ, child_env) for b in binaries]) for name, binaries in PROBES]
    deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        found = [name for name, procs in started if any(_succeeded(p, deadline) for p in procs)]
    finally:
        for _, procs in started:
            for proc in filter(None, procs):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return found + list(ALWAYS)


def resolve(config_runtimes, environ=None):
    """Returns (runtimes, source) where source is 'environment', 'config' or 'detected'.

    Raises ValueError naming ATTUNE_SENSOR_RUNTIMES when the variable holds a bad name; a
    variable that is set but empty counts as unset.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_VAR, "")
    if raw.strip():
        try:
            names = normalise(raw.split(","))
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}: {exc}") from None
        if names:
            return names, "environment"
    if config_runtimes:
        return list(config_runtimes), "config"
    return probe(environ), "detected"
