-- The platform's sensors, placed by its own rules (docs/design.md, "The platform's sensors").

-- Where a placement comes from: `manual` (`attune-sensor place`, kept until `unplace`) or
-- `platform` (a runnable row of the platform's `sensor` table, kept equal to it by the sync
-- pass). What the platform's placement rules add to a placement: its worker_affinity (cleaned:
-- '{}' when it has no term), the runtime versions its runtime_version_constraint accepts
-- ({names, accept}: NULL for any version), and the sensor's trigger instances, given to it as
-- ATTUNE_SENSOR_TRIGGERS.
ALTER TABLE attune_sensor.assignment
    ADD COLUMN origin TEXT NOT NULL DEFAULT 'manual' CHECK (origin IN ('manual', 'platform')),
    ADD COLUMN affinity JSONB NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(affinity) = 'object'),
    ADD COLUMN versions JSONB CHECK (versions IS NULL OR jsonb_typeof(versions) = 'object'),
    ADD COLUMN triggers JSONB NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(triggers) = 'array'
                                                            AND octet_length(triggers::text) <= 131072);

-- The sync pass's one-row gate: at most one pass per sync.SYNC_SPACING, whichever daemon comes
-- first (platform/sync.py). A pass writes in several calls; each carries the token its claim
-- set, and a call whose token is no longer the gate's (a newer pass claimed it: `attune-sensor
-- sync`, or a pass that outlived the spacing) is refused, so two passes never interleave writes.
CREATE TABLE attune_sensor.sync_gate (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    last_sync TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    synced_by TEXT,
    pass_token TEXT
);
INSERT INTO attune_sensor.sync_gate DEFAULT VALUES;
