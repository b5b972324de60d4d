"""Which runtimes this host offers sensors: ATTUNE_SENSOR_RUNTIMES > config > probing binaries.

Detection runs each candidate with --version, the way the spec's reference implementation does,
so a broken interpreter on PATH is not reported as available.
"""

import os
import re
import shutil
import subprocess

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


def _answers(binary, environ):
    path = shutil.which(binary, path=environ.get("PATH", os.defpath))
    if not path:
        return False
    try:
        result = subprocess.run(
            [path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=_child_environment(environ), timeout=PROBE_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def probe(environ=None):
    environ = os.environ if environ is None else environ
    found = [name for name, binaries in PROBES if any(_answers(b, environ) for b in binaries)]
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
