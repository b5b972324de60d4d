"""The file through which a local sensor runtime learns which sensors are placed on this worker
and how each runs (docs/scheduling.md, "The worker's side"): JSON, replaced atomically, never
half written, never through a name someone else can plant."""

import json
import os


def path_for(setting, worker_name, environ):
    """Where the file goes for config sensor.assignments_file: a path, "none" (None), or "auto":
    $RUNTIME_DIRECTORY/assignments-<worker_name>.json under systemd, else None."""
    if setting == "none":
        return None
    if setting == "auto":
        directory = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return os.path.join(directory, f"assignments-{worker_name}.json") if directory else None
    return setting


def write(path, worker_name, worker_id, sensors, states=None):
    """`sensors`: {sensor_ref: {"runtime", "assigned_at", "entrypoint"?}}; `states`: {ref:
    {"status", "pid"}} from the supervisor. Raises OSError; leaves no temporary file behind.

    The temporary file has a random name and is created with O_EXCL|O_NOFOLLOW: a symlink or a
    FIFO planted in the directory is never followed or opened (it cannot be guessed either)."""
    states = states or {}
    document = {"worker": worker_name, "worker_id": worker_id,
                "sensors": [{"sensor_ref": ref, "runtime": row["runtime"],
                             "assigned_at": row["assigned_at"].isoformat() if row.get("assigned_at") else None,
                             "entrypoint": row.get("entrypoint"),
                             "state": states.get(ref, {}).get("status"),
                             "pid": states.get(ref, {}).get("pid")}
                            for ref, row in sorted(sensors.items())]}
    data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    # os.urandom, not secrets: secrets loads hashlib, hmac and random, a visible share of start-up
    temporary = f"{path}.{os.urandom(8).hex()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(temporary, path)  # a reader sees the old file or the new one
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
