"""SensorWorkerRegistration: this worker's own row, in SQL. No sleeping, no signals.

Each call is one statement, timestamps come from the database clock (DESIGN.md decision 1), and
every write after registration is fenced by id AND instance_id (decision 3): a process whose
row was taken over can no longer touch it.
"""

import os
import socket
import time
import uuid

from . import __version__
from .db import json_param
from .errors import WorkerNameConflict, WorkerTakenOver

# One atomic statement (decision 2). Takeover of an existing row is allowed when it is not
# active, is stale by its own interval, or belongs to this machine (a restart after a crash);
# otherwise nothing is returned and the caller reports the owner.
REGISTER_SQL = """
INSERT INTO worker AS w (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat)
VALUES (%(name)s, %(worker_type)s, 'sensor', %(host)s, 'active', %(capabilities)s, %(meta)s, now())
ON CONFLICT (name) DO UPDATE SET
    worker_type = EXCLUDED.worker_type,
    worker_role = CASE WHEN w.worker_role = 'hybrid' THEN w.worker_role ELSE EXCLUDED.worker_role END,
    host = EXCLUDED.host,
    status = 'active',
    capabilities = EXCLUDED.capabilities,
    meta = EXCLUDED.meta,
    last_heartbeat = now()
WHERE w.status IS DISTINCT FROM 'active'
   OR w.last_heartbeat IS NULL
   OR w.last_heartbeat < now() - make_interval(secs => %(stale_multiplier)s * worker_heartbeat_interval(w.capabilities))
   OR w.meta ->> 'machine_id' = EXCLUDED.meta ->> 'machine_id'
RETURNING w.id, (xmax = 0) AS inserted
"""

OWNER_SQL = "SELECT coalesce(meta ->> 'hostname', host, '?'), meta ->> 'instance_id' FROM worker WHERE {} = %s"

HEARTBEAT_SQL = """
UPDATE worker SET last_heartbeat = now(), status = 'active'
WHERE id = %s AND meta ->> 'instance_id' = %s
RETURNING id
"""

DEREGISTER_SQL = """
UPDATE worker SET status = 'inactive'
WHERE id = %s AND meta ->> 'instance_id' = %s
RETURNING id
"""

CAPABILITIES_SQL = """
UPDATE worker SET capabilities = %s
WHERE id = %s AND meta ->> 'instance_id' = %s
RETURNING id
"""


def machine_id():
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as handle:
                value = handle.read().strip()
            if value:
                return value
        except (OSError, UnicodeDecodeError):
            continue
    return "host:" + socket.gethostname()


def in_container():
    # systemd writes /run/systemd/container inside nspawn and most container managers.
    return any(os.path.exists(p) for p in ("/.dockerenv", "/run/.containerenv", "/run/systemd/container"))


class SensorWorkerRegistration:
    """Registers, heartbeats and deregisters one sensor worker.

    >>> registration = SensorWorkerRegistration(db, config, runtimes=["python", "shell"])
    >>> worker_id = registration.register()
    >>> registration.heartbeat()
    >>> registration.add_capability("gpu_enabled", True)
    >>> registration.update_capabilities()
    >>> registration.deregister()
    """

    def __init__(self, db, config, runtimes, environ=None):
        environ = os.environ if environ is None else environ
        sensor = config.sensor
        self.db = db
        self.worker_name = sensor.worker_name
        self.host = sensor.host
        self.worker_type = sensor.worker_type
        if self.worker_type == "auto":
            self.worker_type = "container" if in_container() else "local"
        self.stale_multiplier = sensor.stale_multiplier
        self.instance_id = str(uuid.uuid4())
        self.worker_id = None
        self._capabilities = {}
        self.set_capabilities(config, runtimes)
        self.meta = {
            "pid": os.getpid(),
            "instance_id": self.instance_id,
            "machine_id": machine_id(),
            "hostname": socket.gethostname(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sensor_version": __version__,
        }
        if environ.get("INVOCATION_ID"):
            self.meta["invocation_id"] = environ["INVOCATION_ID"]

    @property
    def capabilities(self):
        return dict(self._capabilities)

    def set_capabilities(self, config, runtimes):
        """Capabilities from a (re)loaded config; call update_capabilities() to store them."""
        sensor = config.sensor
        capabilities = dict(sensor.capabilities)
        capabilities.update(
            runtimes=list(runtimes),
            max_concurrent_sensors=sensor.max_concurrent_sensors,
            sensor_version=__version__,
            heartbeat_interval=sensor.heartbeat_interval,
        )
        self._capabilities = capabilities
        self.stale_multiplier = sensor.stale_multiplier

    def add_capability(self, key, value):
        self._capabilities[key] = value

    def register(self):
        """Inserts or takes over the row; returns its id. Raises WorkerNameConflict when a live
        worker on another machine holds the name."""
        rows = self.db.execute(REGISTER_SQL, {
            "name": self.worker_name,
            "worker_type": self.worker_type,
            "host": self.host,
            "capabilities": json_param(self._capabilities),
            "meta": json_param(self.meta),
            "stale_multiplier": self.stale_multiplier,
        })
        if not rows:
            owner = self.db.execute(OWNER_SQL.format("name"), (self.worker_name,))
            raise WorkerNameConflict(self.worker_name, owner[0][0] if owner else "?")
        self.worker_id = rows[0][0]
        return self.worker_id

    def heartbeat(self):
        """Returns True when the row was updated. A deleted row is registered again (returns
        False); a row that another process took over raises WorkerTakenOver."""
        if self.worker_id is None:
            self.register()
            return False
        if self.db.execute(HEARTBEAT_SQL, (self.worker_id, self.instance_id)):
            return True
        self._after_fence_miss()
        return False

    def update_capabilities(self):
        if self.worker_id is None:
            return
        if not self.db.execute(CAPABILITIES_SQL, (json_param(self._capabilities), self.worker_id, self.instance_id)):
            self._after_fence_miss()

    def deregister(self):
        """Marks the row inactive; True when it was still ours."""
        if self.worker_id is None:
            return False
        return bool(self.db.execute(DEREGISTER_SQL, (self.worker_id, self.instance_id)))

    def _after_fence_miss(self):
        owner = self.db.execute(OWNER_SQL.format("id"), (self.worker_id,))
        if owner and owner[0][1] != self.instance_id:
            raise WorkerTakenOver(self.worker_name, owner[0][0])
        # The row is gone (deleted by an operator): register again, keeping our instance id.
        self.worker_id = None
        self.register()
