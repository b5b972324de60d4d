"""The file through which a local sensor runtime learns which sensors are placed on this worker
(docs/scheduling.md, "The worker's side"): JSON, replaced atomically, never half written."""

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


def write(path, worker_name, worker_id, sensors):
    """`sensors`: {sensor_ref: {"runtime", "assigned_at"}}. Raises OSError; leaves no temporary
    file behind."""
    document = {"worker": worker_name, "worker_id": worker_id,
                "sensors": [{"sensor_ref": ref, "runtime": row["runtime"],
                             "assigned_at": row["assigned_at"].isoformat() if row["assigned_at"] else None}
                            for ref, row in sorted(sensors.items())]}
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, path)  # a reader sees the old file or the new one
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
