"""The sync pass: attune-sensor's assignments of origin `platform` made equal to the platform's
runnable sensors (sensors.py), by one pass fleet-wide at a time (docs/design.md, "The
platform's sensors").

Every daemon offers to run it at its survey cadence (max(10 s, interval), never on the heartbeat
path); the one-row gate `attune_sensor.sync_gate` lets the first through and keeps the others
out for SYNC_SPACING, so a fleet of any size reads the platform's sensors about once per
SYNC_SPACING, and a change made there is seen within max(interval, 10 s) + 2 s by a fleet of one.
`attune-sensor sync` runs it at once. A pass reads and writes CHUNK sensors at a time through
the SQL function `attune_sensor.sync_platform_sensors` (which writes only platform placements,
never a manual one), and removes what is no longer runnable in its last call; each call carries
the token of the pass's claim, so a newer pass stops an older one.
"""

import secrets
from dataclasses import dataclass, field

from . import sensors
from ..db.schema import SYNC_GATE
from ..errors import DatabaseError

SYNC_SPACING = 8.0
# The first daemon whose survey comes after SYNC_SPACING takes the gate, with a new token that
# each of the pass's writes carries; the others skip it (SKIP LOCKED: a daemon never waits for
# another's pass). `attune-sensor sync` waits for its turn and takes the gate whenever: a pass
# still writing then finds its token gone and stops.
_CLAIM_SQL = """
UPDATE {gate} SET last_sync = now(), synced_by = %(by)s, pass_token = %(token)s
 WHERE only_row = (SELECT only_row FROM {gate}
                    WHERE %(force)s OR last_sync <= now() - make_interval(secs => %(spacing)s)
                    FOR UPDATE {wait})
RETURNING true
"""
CLAIM_SQL = _CLAIM_SQL.format(gate=SYNC_GATE, wait="SKIP LOCKED")
CLAIM_WAITING_SQL = _CLAIM_SQL.format(gate=SYNC_GATE, wait="")
WRITE_SQL = ("SELECT sensor_ref, change FROM attune_sensor.sync_platform_sensors("
             "%(upserts)s::jsonb, %(keep)s::text[], %(token)s, %(lock)s)")
SUPERSEDED = "another sync pass took over"  # the write function's refusal


class TooManySensors(Exception):
    """More runnable sensors than a pass reads: nothing is written (a partial list would
    unplace the rest)."""


class Superseded(Exception):
    """A newer pass took the gate while this one was writing: this one stops (what it wrote
    stays; the newer pass writes what it read, later)."""


@dataclass
class SyncResult:
    ran: bool = False  # False: another daemon's pass is recent, or running
    runnable: int = 0
    changes: list = field(default_factory=list)  # [(ref, 'added' | 'changed' | 'removed')]
    refused: list = field(default_factory=list)  # [(ref, why)]: runnable on no worker
    defaulted: list = field(default_factory=list)  # [(ref, why)]: a value read as its default
    manual: list = field(default_factory=list)  # refs the platform runs that a manual placement holds

    def count(self, change):
        return sum(1 for _, kind in self.changes if kind == change)


def run(db, by, lock_key, force=False):
    """One pass when the gate lets this caller through (always with `force`): the runnable
    sensors read and written CHUNK at a time, then the placements of those no longer runnable
    removed. Raises TooManySensors past sensors.MAX_SENSORS, Superseded when a newer pass took
    the gate, DatabaseError / DatabaseUnavailable as any statement."""
    token = secrets.token_hex(16)
    claimed = db.execute(CLAIM_WAITING_SQL if force else CLAIM_SQL,
                         {"by": by, "force": force, "spacing": SYNC_SPACING, "token": token})
    if not claimed:
        return SyncResult()
    ids = sensors.runnable_ids(db)
    if len(ids) > sensors.MAX_SENSORS:
        raise TooManySensors(f"the platform has more than {sensors.MAX_SENSORS} runnable sensors; the sync pass "
                             "reads at most that many and changed nothing")
    result = SyncResult(ran=True)
    keep = []
    for start in range(0, len(ids), sensors.CHUNK):
        placements, refused, defaulted = sensors.runnable(db, ids[start:start + sensors.CHUNK])
        result.refused += refused
        result.defaulted += defaulted
        keep += [p.sensor_ref for p in placements]
        _write(db, result, "[" + ",".join(p.as_json() for p in placements) + "]", None, token, lock_key)
    _write(db, result, "[]", keep, token, lock_key)
    result.runnable = len(keep)
    result.changes.sort()
    return result


def _write(db, result, upserts, keep, token, lock_key):
    try:
        rows = db.execute(WRITE_SQL, {"upserts": upserts, "keep": keep, "token": token, "lock": lock_key})
    except DatabaseError as exc:
        if SUPERSEDED in str(exc):
            raise Superseded(SUPERSEDED) from None
        raise
    for ref, change in rows:
        (result.manual.append(ref) if change == "manual kept" else result.changes.append((ref, change)))
