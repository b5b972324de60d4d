"""Finding this worker's sensor processes by the marks in their environment, wherever they went:
what a stopped sensor started in another process group (coreutils' `timeout` makes one), and
what a daemon killed with SIGKILL left running (docs/design.md, "Running sensors").

Every sensor starts with ATTUNE_SENSOR_WORKER (the worker's name) and ATTUNE_SENSOR_INSTANCE
(the daemon's instance id) in its environment, which its children inherit and a placement may
not set (launch.FORBIDDEN_ENV_RE). A process is this worker's only if its environment, read from
/proc, carries both; a reused pid or another user's process never does. A process that clears
its environment before it execs leaves the supervision (docs/operations.md).
"""

import os
import signal

from .. import logs

log = logs.get("runner")
WORKER_VAR = "ATTUNE_SENSOR_WORKER"
INSTANCE_VAR = "ATTUNE_SENSOR_INSTANCE"
REF_VAR = "ATTUNE_SENSOR_REF"
MAX_ENVIRON = 1 << 20


def marks(worker, instance):
    """The variables that mark a sensor of this daemon."""
    return {WORKER_VAR: worker, INSTANCE_VAR: instance}


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            data = handle.read(MAX_ENVIRON)
    except OSError:
        return None  # gone, or another user's: not ours
    found = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in (b"ATTUNE_SENSOR_WORKER", b"ATTUNE_SENSOR_INSTANCE", b"ATTUNE_SENSOR_REF"):
            found[key.decode()] = value.decode("utf-8", "replace")
    return found


def find(worker, instance=None, other_instances=False, ref=None):
    """Pids marked with `worker` and, as asked, this `instance` (or any other), and `ref`."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        env = _environ(entry)
        if not env or env.get(WORKER_VAR) != worker or INSTANCE_VAR not in env:
            continue
        if other_instances and env[INSTANCE_VAR] == instance:
            continue
        if not other_instances and instance is not None and env[INSTANCE_VAR] != instance:
            continue
        if ref is not None and env.get(REF_VAR) != ref:
            continue
        found.append(int(entry))
    return found


def signal_all(pids, signum):
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, signum)
            sent += 1
        except (ProcessLookupError, PermissionError):
            continue
    return sent


def reap_previous(worker, instance):
    """Kills every process another instance of this worker's daemon started (one killed with
    SIGKILL, or one whose row this daemon took over and which has stopped since); returns how
    many."""
    killed = signal_all(find(worker, instance, other_instances=True), signal.SIGKILL)
    if killed:
        log.warning("killed %d process(es) that sensors of a previous run of worker %s left behind", killed, worker)
    return killed
