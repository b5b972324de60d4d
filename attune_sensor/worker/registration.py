"""SensorWorkerRegistration: this worker's own row, in SQL. No sleeping, no signals.

Each call is one statement and timestamps come from the database clock (docs/design.md,
"Clocks"). Every write after registration is fenced by the row's id and its `xmin`, the id of
the transaction that last wrote it (docs/design.md, "Fencing"): any other writer, whoever it is,
changes `xmin`, so a heartbeat that matches no row means someone else touched ours. Only then
is the row read and the change classified:

* gone: register again;
* another instance's (meta.instance_id): WorkerTakenOver;
* host, role, capabilities or meta rewritten: ForeignWriter (exit 78), since two programs
  heartbeating one row would hide each other's death;
* only last_heartbeat, status, cordon columns or the reaper's marks changed: adopt the change
  and go on (an operator's status is logged and set back to active; a cordon is left alone).
  A heartbeat whose reply was lost looks exactly like another program's heartbeat, so a
  heartbeat alone is never called foreign: another program's registration is what gives it away.
"""

import json
import os
import socket
import time
from dataclasses import dataclass

from .. import __version__
from ..db import json_param
from ..errors import (ForeignWriter, WorkerNameConflict, WorkerNameHeldByOtherRole, WorkerNameHeldByPlatform,
                      WorkerTakenOver)
from .runtimes import runtime_versions
from ..fleet import PLATFORM_ROW, REAPER_META_KEYS
from ..db.schema import DEFAULT_RECORDED_INTERVAL, heartbeat_interval_of, multiplier_of, stale_condition

# What each full write returns, to know our row as the database stored it.
TRACKED = "xmin::text, host, worker_role::text, capabilities, meta, last_heartbeat"
TRACKED_FIELDS = ("xmin", "host", "role", "capabilities", "meta", "last_heartbeat")

# One atomic statement (docs/design.md, "Registration"). Only sensor (and hybrid) rows are ever
# taken over, and only when not active, stale by their own interval, or from this machine (a
# restart after a crash); otherwise nothing is returned and the caller reports the owner. The
# role is compared as text so a database whose enum lacks 'hybrid' is never sent that value.
REGISTER_SQL = f"""
WITH previous AS (
    -- the row as it was, if another live instance held it (a second daemon on this machine
    -- under the same name): the window in which that instance must stop its sensors
    SELECT make_interval(secs => greatest(%(stale_multiplier)s, {multiplier_of("p")}) * {heartbeat_interval_of("p")})
           - (now() - p.last_heartbeat) AS remaining
      FROM worker AS p
     WHERE p.name = %(name)s AND p.status::text = 'active' AND p.last_heartbeat IS NOT NULL
       AND p.meta ->> 'instance_id' IS DISTINCT FROM %(instance)s
       AND NOT {stale_condition("p", "%(stale_multiplier)s")}
), upsert AS (
INSERT INTO worker AS w (name, worker_type, worker_role, host, status, capabilities, meta, last_heartbeat)
VALUES (%(name)s, %(worker_type)s, 'sensor', %(host)s, 'active', %(capabilities)s, %(meta)s, now())
ON CONFLICT (name) DO UPDATE SET
    worker_type = EXCLUDED.worker_type,
    host = EXCLUDED.host,
    status = 'active',
    capabilities = EXCLUDED.capabilities,
    meta = EXCLUDED.meta,
    last_heartbeat = now()
WHERE w.worker_role::text IN ('sensor', 'hybrid')
  AND (w.status::text <> 'active'
       OR w.last_heartbeat IS NULL
       OR {stale_condition("w", "%(stale_multiplier)s")}
       OR w.meta ->> 'machine_id' = EXCLUDED.meta ->> 'machine_id')
RETURNING w.id, {TRACKED}
)
SELECT upsert.*, (SELECT extract(epoch FROM remaining)::float8 FROM previous) FROM upsert
"""

# who holds a name we could not take; whether the row is the platform's own sensor service's
OWNER_SQL = ("SELECT coalesce(w.meta ->> 'hostname', w.host, '?'), w.meta ->> 'instance_id', w.worker_role::text, "
             f"{PLATFORM_ROW} FROM worker AS w WHERE w.name = %s")

READ_SQL = f"SELECT {TRACKED}, status::text FROM worker WHERE id = %s"

# The heartbeat: one HOT update of last_heartbeat (status is rewritten with the same value).
HEARTBEAT_SQL = """
UPDATE worker SET last_heartbeat = now(), status = 'active'
WHERE id = %(id)s AND xmin = %(xmin)s::xid
RETURNING xmin::text, last_heartbeat
"""

# The same heartbeat, carrying the fleet's gated reaper: still one statement, a call of the
# function attune_sensor.heartbeat (own migration 20261201000004), whose statements the server
# plans once per session instead of at every beat (docs/design.md, "Reaper"). The worker table in
# its body is found through the search_path each statement carries (db/schema.py), so the one
# function serves both flavours. It always returns one row: the workers it marked inactive come
# back with it, for the journal and their sensors' failover, even when the fence missed (the
# reap committed all the same); the beat's own columns are NULL then.
REAPING_HEARTBEAT_SQL = """
SELECT beat_xmin, beat_at, reaped FROM attune_sensor.heartbeat(%(id)s, %(xmin)s::xid, %(name)s, %(multiplier)s)
"""

# After the reaper marked us inactive while we were alive: active again, its marks removed.
RESUME_SQL = f"""
UPDATE worker SET last_heartbeat = now(), status = 'active',
       meta = meta{"".join(f" - '{key}'" for key in REAPER_META_KEYS)}
WHERE id = %(id)s AND xmin = %(xmin)s::xid
RETURNING {TRACKED}
"""

DEREGISTER_SQL = """
UPDATE worker SET status = 'inactive'
WHERE id = %(id)s AND xmin = %(xmin)s::xid
RETURNING xmin::text
"""

CAPABILITIES_SQL = f"""
UPDATE worker SET capabilities = %(capabilities)s
WHERE id = %(id)s AND xmin = %(xmin)s::xid
RETURNING {TRACKED}
"""


@dataclass(frozen=True)
class Heartbeat:
    """What one heartbeat did (SensorWorkerRegistration.heartbeat)."""
    updated: bool  # our row was updated; False: it was missing and was registered again
    reaped: tuple = ()  # (id, name, host) of the workers this heartbeat's reaper marked inactive
    outside_change: str = None  # someone else set our row's status ("reaped by X", ...): the service logs it

    def __bool__(self):
        return self.updated


def partial_heartbeat(exc):
    """What a heartbeat that raised `exc` had done before it raised (a Heartbeat whose reap
    committed), or None."""
    return getattr(exc, "heartbeat", None)


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


def _uuid4():
    """A random (version 4) UUID as text, as str(uuid.uuid4()) gives it, without importing uuid,
    which loads the platform module at every start (docs/performance.md §1)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class SensorWorkerRegistration:
    """Registers, heartbeats and deregisters one sensor worker.

    >>> registration = SensorWorkerRegistration(db, config, runtimes=["python", "shell"])
    >>> worker_id = registration.register()
    >>> beat = registration.heartbeat()   # Heartbeat(updated, reaped, outside_change)
    >>> registration.add_capability("gpu_enabled", True)
    >>> registration.update_capabilities()
    >>> registration.deregister()
    """

    def __init__(self, db, config, runtimes, environ=None, interpreters=()):
        environ = os.environ if environ is None else environ
        sensor = config.sensor
        self.db = db
        self.worker_name = sensor.worker_name
        self.host = sensor.host
        self.worker_type = sensor.worker_type
        if self.worker_type == "auto":
            self.worker_type = "container" if in_container() else "local"
        self.stale_multiplier = sensor.stale_multiplier
        self.instance_id = _uuid4()
        self.worker_id = None
        self._row = {}  # our row as the database last returned it (TRACKED_FIELDS + status)
        self._sent_capabilities = None  # the last capabilities update sent, in case its reply is lost
        # a status someone else set on our row, seen by a call that is not a heartbeat (a
        # capabilities update): the next Heartbeat reports it
        self._unreported_change = None
        # Set (to the stale multiplier) to carry the fleet's reaper in each heartbeat.
        self.reap_multiplier = None
        self.previous_window = None
        self._capabilities = {}
        self.set_capabilities(config, runtimes, interpreters=interpreters)
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

    def set_capabilities(self, config, runtimes, heartbeat_interval=None, interpreters=()):
        """Capabilities from a (re)loaded config, in the platform's shape (runtimes with their
        versions and interpreters, labels, taints); call update_capabilities() to store them."""
        sensor = config.sensor
        if heartbeat_interval is None:
            heartbeat_interval = sensor.heartbeat_interval or DEFAULT_RECORDED_INTERVAL
        capabilities = dict(sensor.capabilities)
        capabilities.update(
            runtimes=list(runtimes),
            max_concurrent_sensors=sensor.max_concurrent_sensors,
            sensor_version=__version__,
            heartbeat_interval=heartbeat_interval,
            # the window this worker promises to stop its sensors in (runner/fence.py)
            stale_multiplier=sensor.stale_multiplier,
            runtime_versions=runtime_versions(interpreters),
            detected_interpreters=[dict(i) for i in interpreters],
        )
        if sensor.labels:
            capabilities["labels"] = dict(sensor.labels)
        if sensor.taints:
            capabilities["taints"] = [dict(t) for t in sensor.taints]
        self._capabilities = capabilities
        self.stale_multiplier = sensor.stale_multiplier

    def stored_capabilities(self):
        """The capabilities as the database last returned them (None before registering)."""
        return self._row.get("capabilities")

    def add_capability(self, key, value):
        self._capabilities[key] = value

    def register(self):
        """Inserts or takes over the row; returns its id. Raises WorkerNameConflict when a live
        worker on another machine holds the name, WorkerNameHeldByOtherRole when a worker of
        another role (an action worker) does, WorkerNameHeldByPlatform when a live sensor row of
        the platform's own sensor service (fleet.PLATFORM_ROW) does."""
        rows = self.db.execute(REGISTER_SQL, {
            "name": self.worker_name,
            "worker_type": self.worker_type,
            "host": self.host,
            "capabilities": json_param(self._capabilities),
            "meta": json_param(self.meta),
            "stale_multiplier": self.stale_multiplier,
            "instance": self.instance_id,
        })
        if not rows:
            owner = self.db.execute(OWNER_SQL, (self.worker_name,))
            host, _, role, platforms = owner[0] if owner else ("?", None, "sensor", False)
            if role not in ("sensor", "hybrid"):
                raise WorkerNameHeldByOtherRole(self.worker_name, role, host)
            if platforms:
                # a live sensor row no attune-sensor registered: the platform's own sensor
                # service runs it (docs/design.md, "Only our rows are ours")
                raise WorkerNameHeldByPlatform(self.worker_name, host)
            raise WorkerNameConflict(self.worker_name, host)
        self.worker_id = rows[0][0]
        self._remember(rows[0][1:-1])
        # seconds until the live instance this registration took the row from must have stopped
        # its sensors (None: the row was free, stale or ours)
        self.previous_window = rows[0][-1] if rows[0][-1] and rows[0][-1] > 0 else None
        return self.worker_id

    def heartbeat(self):
        """One heartbeat; returns a Heartbeat: whether our row was updated (False: it was missing
        and was registered again), the workers this heartbeat's reaper marked inactive, and a
        status someone else had set on our row. A row that another process took over or
        rewrote raises WorkerNameConflict. When anything raises after the reap committed, the
        exception carries what was done (partial_heartbeat(exc)): the reaped workers must still
        be logged and failed over."""
        if self.worker_id is None:
            self.register()
            return Heartbeat(updated=False)
        reaped = ()
        if self.reap_multiplier is not None:
            rows = self.db.execute(REAPING_HEARTBEAT_SQL, dict(
                self._fence(), name=self.worker_name, multiplier=self.reap_multiplier))
            reaped = tuple(tuple(r) for r in rows[0][2])
            rows = [] if rows[0][0] is None else rows  # the fence missed: someone else wrote our row
        else:
            rows = self.db.execute(HEARTBEAT_SQL, self._fence())
        if rows:
            self._row["xmin"], self._row["last_heartbeat"] = rows[0][:2]
            change, self._unreported_change = self._unreported_change, None
            return Heartbeat(updated=True, reaped=reaped, outside_change=change)
        try:
            updated = self._after_missed_beat()
        except Exception as exc:
            if reaped:
                exc.heartbeat = Heartbeat(updated=False, reaped=reaped)
            raise
        change, self._unreported_change = self._unreported_change, None
        return Heartbeat(updated=updated, reaped=reaped, outside_change=change)

    def _after_missed_beat(self):
        """The fence missed: adopts what someone else wrote (or registers again when the row is
        gone, returning False) and beats once more with the new fence. True when it got through."""
        if not self._after_fence_miss():
            return False
        # the outside change is adopted: one more try, this time with our fence
        resume = self._row.get("status") != "active" or any(k in (self._row["meta"] or {}) for k in REAPER_META_KEYS)
        rows = self.db.execute(RESUME_SQL if resume else HEARTBEAT_SQL, self._fence())
        if not rows:  # written again in between: the next beat looks once more
            return False
        if resume:
            self._remember(rows[0])
        else:
            self._row["xmin"], self._row["last_heartbeat"] = rows[0]
        return True

    def update_capabilities(self):
        if self.worker_id is None:
            return
        self._sent_capabilities = json.loads(json_param(self._capabilities))
        for _ in range(2):
            params = dict(self._fence(), capabilities=json_param(self._capabilities))
            rows = self.db.execute(CAPABILITIES_SQL, params)
            if rows:
                self._remember(rows[0])
                return
            if not self._after_fence_miss():
                return  # registered again, with the new capabilities

    def deregister(self):
        """Marks the row inactive; True when it was still ours. A row that another program took
        over or rewrote is left as it is (False)."""
        if self.worker_id is None:
            return False
        for _ in range(2):
            if self.db.execute(DEREGISTER_SQL, self._fence()):
                return True
            current = self._read()
            if current is None:
                return False
            try:
                self._classify(current)
            except WorkerNameConflict:
                return False  # taken over or rewritten: not ours to mark
        return False

    # --- fencing ------------------------------------------------------------------------

    def _fence(self):
        return {"id": self.worker_id, "xmin": self._row["xmin"]}

    def _remember(self, tracked):
        self._row = dict(zip(TRACKED_FIELDS, tracked), status="active")

    def _after_fence_miss(self):
        """Someone else wrote our row. True when the change is one we adopt (the caller
        retries); False when the row was gone and we registered again; raises otherwise."""
        current = self._read()
        if current is None:
            # The row is gone (deleted by an operator): register again, keeping our instance id.
            self.worker_id = None
            self.register()
            return False
        self._classify(current)
        return True

    def _read(self):
        """Our row as it is now (TRACKED_FIELDS + status), or None when it is gone."""
        rows = self.db.execute(READ_SQL, (self.worker_id,))
        return dict(zip(TRACKED_FIELDS + ("status",), rows[0])) if rows else None

    def _classify(self, current):
        mine = self._row
        meta = dict(current["meta"] or {})
        owner_host = meta.get("hostname") or current["host"] or "?"
        if meta.get("instance_id") != self.instance_id:
            raise WorkerTakenOver(self.worker_name, owner_host)
        changed = [field for field in ("host", "role", "capabilities") if current[field] != mine[field]]
        if "capabilities" in changed and current["capabilities"] == self._sent_capabilities:
            changed.remove("capabilities")  # our own update whose reply was lost
        if _without_reaper_marks(meta) != _without_reaper_marks(mine["meta"]):
            changed.append("meta")
        if changed:
            raise ForeignWriter(self.worker_name, self.worker_id, changed, current["host"] or owner_host)
        if current["status"] != mine.get("status"):
            if current["status"] != "active":
                self._unreported_change = ("reaped by " + str(meta.get("reaped_by"))) if "reaped_at" in meta \
                    else f"status set to {current['status']} by someone else"
        mine.update(xmin=current["xmin"], meta=current["meta"], status=current["status"],
                    capabilities=current["capabilities"], last_heartbeat=current["last_heartbeat"])


def _without_reaper_marks(meta):
    return {k: v for k, v in (meta or {}).items() if k not in REAPER_META_KEYS}
