"""The sync pass: attune-sensor's assignments of origin `platform` made equal to the platform's
runnable sensors (sensors.py), by one pass fleet-wide at a time (docs/design.md, "The
platform's sensors").

Every daemon offers to run it at its survey cadence (max(10 s, interval), never on the heartbeat
path); the one-row gate `attune_sensor.sync_gate` lets the first through and keeps the others
out for SYNC_SPACING, so a fleet of any size reads the platform's sensors about once per
SYNC_SPACING, and a change made there is seen within max(interval, 10 s) + 2 s by a fleet of one.
`attune-sensor sync` runs it at once. The write is one call of the SQL function
`attune_sensor.sync_platform_sensors`, which deletes only platform placements.
"""

from dataclasses import dataclass, field

from . import sensors
from ..db.schema import SYNC_GATE

SYNC_SPACING = 8.0
# The first daemon whose survey comes after SYNC_SPACING takes the gate; the others skip it
# (SKIP LOCKED: a daemon never waits for another's pass). `attune-sensor sync` waits for its turn.
_CLAIM_SQL = """
UPDATE {gate} SET last_sync = now(), synced_by = %(by)s
 WHERE only_row = (SELECT only_row FROM {gate}
                    WHERE %(force)s OR last_sync <= now() - make_interval(secs => %(spacing)s)
                    FOR UPDATE {wait})
RETURNING true
"""
CLAIM_SQL = _CLAIM_SQL.format(gate=SYNC_GATE, wait="SKIP LOCKED")
CLAIM_WAITING_SQL = _CLAIM_SQL.format(gate=SYNC_GATE, wait="")
WRITE_SQL = "SELECT sensor_ref, change FROM attune_sensor.sync_platform_sensors(%(desired)s::jsonb, %(lock)s)"


class TooManySensors(Exception):
    """More runnable sensors than a pass reads: nothing is written (a partial list would
    unplace the rest)."""


@dataclass
class SyncResult:
    ran: bool = False  # False: another daemon's pass is recent, or running
    runnable: int = 0
    changes: list = field(default_factory=list)  # [(ref, 'added' | 'changed' | 'taken over' | 'removed')]
    refused: list = field(default_factory=list)  # [(ref, why)]: runnable on no worker
    defaulted: list = field(default_factory=list)  # [(ref, why)]: a value read as its default

    def count(self, change):
        return sum(1 for _, kind in self.changes if kind == change)


def run(db, by, lock_key, force=False):
    """One pass when the gate lets this caller through (always with `force`). Raises
    TooManySensors when the platform has more than sensors.MAX_SENSORS runnable sensors."""
    claimed = db.execute(CLAIM_WAITING_SQL if force else CLAIM_SQL,
                         {"by": by, "force": force, "spacing": SYNC_SPACING})
    if not claimed:
        return SyncResult()
    placements, refused, defaulted, more = sensors.runnable(db)
    if more:
        raise TooManySensors(f"the platform has more than {sensors.MAX_SENSORS} runnable sensors; the sync pass "
                             "reads at most that many and changed nothing")
    desired = "[" + ",".join(p.as_json() for p in placements) + "]"
    changes = [tuple(row) for row in db.execute(WRITE_SQL, {"desired": desired, "lock": lock_key})]
    return SyncResult(ran=True, runnable=len(placements), changes=sorted(changes), refused=refused,
                      defaulted=defaulted)
