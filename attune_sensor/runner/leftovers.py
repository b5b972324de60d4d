"""What a daemon killed with SIGKILL outside systemd can leave running, found and stopped by the
next daemon of the same worker before it registers (docs/design.md, "Running sensors").

PR_SET_PDEATHSIG kills each sensor's own process when the daemon dies, but not what that
process started (a shell sensor's `sleep`, a worker pool). Each sensor runs in a session and
process group of its own, so the daemon records each group (its id and its leader's start
time) in a small file; at start the next daemon kills every group in that file whose leader is
gone but whose members still run. Under systemd the unit's cgroup does this already.
"""

import os
import signal
import stat

from .. import logs

log = logs.get("runner")
MAX_RECORD_BYTES = 1 << 20


def record_path(worker_name, environ):
    """$RUNTIME_DIRECTORY (systemd), else $XDG_RUNTIME_DIR/attune-sensor, else
    /tmp/attune-sensor-<uid>: a directory of this user's, made 0700 if missing."""
    directory = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not directory:
        base = environ.get("XDG_RUNTIME_DIR") or "/tmp"
        directory = os.path.join(base, "attune-sensor" if base != "/tmp" else f"attune-sensor-{os.geteuid()}")
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            log.warning("not recording sensor process groups: %s is not a private directory of this user", directory)
            return None
    return os.path.join(directory, f"sensors-{worker_name}.pgids")


def _start_time(pid):
    """The process's start time in clock ticks since boot, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _running(pid):
    """True when `pid` exists and is not a zombie (a dead leader its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def leader_start(pid):
    return _start_time(pid)


def write(path, groups):
    """`groups`: {pgid: leader start time}. Best effort; never follows a planted link."""
    if path is None:
        return
    data = "".join(f"{pgid} {start}\n" for pgid, start in sorted(groups.items())).encode()
    temporary = f"{path}.tmp"
    try:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("could not record the sensors' process groups in %s: %s", path, exc.strerror)


def _members(pgid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) == pgid and int(fields[3]) == pgid:  # its group and its session
                found.append((int(entry), int(fields[19])))
        except (OSError, IndexError, ValueError):
            continue
    return found


def reap(path):
    """Kills the groups a previous daemon recorded whose leader is gone; returns how many
    processes it killed. A group whose id now belongs to a live leader of another start time
    (the id was reused) is left alone, as is one whose members started before the leader did."""
    if path is None:
        return 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        text = os.read(fd, MAX_RECORD_BYTES).decode("ascii", "replace")
    finally:
        os.close(fd)
    killed = 0
    for line in text.splitlines():
        try:
            pgid, start = (int(part) for part in line.split())
        except ValueError:
            continue
        if pgid <= 1 or _running(pgid):
            continue  # the leader still runs (a daemon that is alive, or a reused id): not ours to kill
        members = [pid for pid, began in _members(pgid) if began >= start]
        if not members:
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed += len(members)
        except (ProcessLookupError, PermissionError):
            continue
    if killed:
        log.warning("killed %d process(es) that sensors of a previous run of this worker left behind", killed)
    write(path, {})
    return killed
