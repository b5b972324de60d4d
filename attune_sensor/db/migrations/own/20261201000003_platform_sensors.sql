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

-- The platform's rules as SQL the server keeps (scheduling.rs, runtime_detection.rs,
-- version_matching.rs at 9206d41), for the placement walk (placement/scheduler.py CHECKS).
-- platform/rules.py is their Python side; tests hold the two to the same answers.

-- runtime_detection::normalize_runtime_name
CREATE FUNCTION attune_sensor.runtime_name(name text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE n WHEN 'nodejs' THEN 'node' WHEN 'node.js' THEN 'node' WHEN 'python3' THEN 'python'
              WHEN 'bash' THEN 'shell' WHEN 'sh' THEN 'shell' WHEN 'builtin' THEN 'native'
              WHEN 'standalone' THEN 'native' WHEN 'rb' THEN 'ruby' WHEN 'golang' THEN 'go'
              WHEN 'jdk' THEN 'java' WHEN 'openjdk' THEN 'java' WHEN 'perl5' THEN 'perl'
              WHEN 'rscript' THEN 'r' ELSE n END
  FROM (SELECT lower(regexp_replace(name, '^\s+|\s+$', '', 'g')) AS n) AS t
$$;

-- worker_labels_from_capabilities: the labels, when they are an object of strings; else none.
-- No sub-SELECT, so that the planner inlines it (a SQL function with one is planned per call).
CREATE FUNCTION attune_sensor.worker_labels(capabilities jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE WHEN jsonb_typeof(capabilities -> 'labels') IS DISTINCT FROM 'object' THEN '{}'::jsonb
            WHEN jsonb_path_exists(capabilities -> 'labels', '$.* ? (@.type() != "string")') THEN '{}'::jsonb
            ELSE capabilities -> 'labels' END
$$;

-- selector_term_matches: every match_label, every expression.
CREATE FUNCTION attune_sensor.term_matches(labels jsonb, term jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT labels @> coalesce(term -> 'match_labels', '{}'::jsonb)
   AND NOT EXISTS (
       SELECT 1 FROM jsonb_array_elements(coalesce(term -> 'match_expressions', '[]'::jsonb)) AS e(x)
        WHERE NOT CASE e.x ->> 'operator'
              WHEN 'in' THEN coalesce(labels ->> (e.x ->> 'key') IN
                                      (SELECT jsonb_array_elements_text(e.x -> 'values')), false)
              WHEN 'not_in' THEN labels ->> (e.x ->> 'key') IS NULL
                              OR labels ->> (e.x ->> 'key') NOT IN
                                 (SELECT jsonb_array_elements_text(e.x -> 'values'))
              WHEN 'exists' THEN labels ? (e.x ->> 'key')
              WHEN 'does_not_exist' THEN NOT labels ? (e.x ->> 'key')
              ELSE false END)
$$;

-- required_affinity_matches AND anti_affinity_allows
CREATE FUNCTION attune_sensor.affinity_allows(labels jsonb, affinity jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT (jsonb_array_length(coalesce(affinity -> 'required', '[]'::jsonb)) = 0
        OR EXISTS (SELECT 1 FROM jsonb_array_elements(affinity -> 'required') AS t(term)
                    WHERE attune_sensor.term_matches(labels, t.term)))
   AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(affinity -> 'anti_affinity', '[]'::jsonb)) AS t(term)
                    WHERE attune_sensor.term_matches(labels, t.term))
$$;

-- preferred_affinity_score: the weights of the preferred terms a worker's labels match.
CREATE FUNCTION attune_sensor.affinity_score(labels jsonb, affinity jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT coalesce(sum((p.x ->> 'weight')::bigint), 0)
  FROM jsonb_array_elements(coalesce(affinity -> 'preferred', '[]'::jsonb)) AS p(x)
 WHERE attune_sensor.term_matches(labels, p.x -> 'preference')
$$;

-- version_matching::parse_version, reduced to what a worker's version is compared by:
-- major.minor, or NULL when it is no version.
CREATE FUNCTION attune_sensor.version_key(version text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
WITH t AS (
    SELECT regexp_replace(regexp_replace(version, '^\s+|\s+$', '', 'g'), '^[vV]', '') AS s
), strict AS (
    SELECT '^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)'
           '(-(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(\.(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?'
           '(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$' AS re
), padded AS (
    SELECT CASE WHEN t.s ~ strict.re THEN t.s
                WHEN cardinality(string_to_array(t.s, '.')) = 1 THEN t.s || '.0.0'
                WHEN cardinality(string_to_array(t.s, '.')) = 2 THEN t.s || '.0'
                ELSE array_to_string((string_to_array(t.s, '.'))[1:3], '.') END AS s, strict.re
      FROM t, strict
)
SELECT CASE WHEN s ~ re THEN substring(s FROM '^([0-9]+\.[0-9]+)') END FROM padded
$$;

-- Whether a worker may run a sensor whose runtime_version_constraint `want` describes
-- ({names: the runtime's normalised names, accept: the major.minor of the registered versions
-- that satisfy it}): it advertises one of those versions for the runtime (runtime_versions,
-- else detected_interpreters), or none at all (the platform then uses every registered one).
CREATE FUNCTION attune_sensor.offers_version(capabilities jsonb, want jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
WITH names AS (
    SELECT jsonb_array_elements_text(want -> 'names') AS name
), listed AS (
    SELECT v.x #>> '{}' AS version
      FROM names CROSS JOIN LATERAL jsonb_array_elements(
               CASE WHEN jsonb_typeof(capabilities -> 'runtime_versions' -> names.name) = 'array'
                    THEN capabilities -> 'runtime_versions' -> names.name ELSE '[]'::jsonb END) AS v(x)
     WHERE jsonb_typeof(v.x) = 'string'
), detected AS (
    SELECT i.x ->> 'version' AS version
      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(capabilities -> 'detected_interpreters') = 'array'
                                     THEN capabilities -> 'detected_interpreters' ELSE '[]'::jsonb END) AS i(x)
     WHERE jsonb_typeof(i.x -> 'name') = 'string' AND jsonb_typeof(i.x -> 'version') = 'string'
       AND attune_sensor.runtime_name(i.x ->> 'name') IN (SELECT name FROM names)
), advertised AS (
    SELECT version FROM listed
    UNION ALL
    SELECT version FROM detected WHERE NOT EXISTS (SELECT 1 FROM listed)
)
SELECT want IS NULL
    OR NOT EXISTS (SELECT 1 FROM advertised)
    OR EXISTS (SELECT 1 FROM advertised
                WHERE attune_sensor.version_key(version) IN (SELECT jsonb_array_elements_text(want -> 'accept')))
$$;

-- The sync pass's write (platform/sync.py), in calls of bounded size under the placement lock:
-- `upserts` (a JSON array of runnable sensors' placements) made equal, then, in the pass's last
-- call, `keep` (every runnable ref): the platform placements not in it are deleted. New sensors
-- arrive pending; a changed one keeps its worker (the next survey releases it if that worker may
-- no longer run it); an entry without `triggers` keeps the row's (unchanged: the pass sends
-- only what changed). Only placements of origin `platform` are written or deleted: a manual
-- placement of the same ref is left as it is and reported ('manual kept'), since no caller can
-- prove here that the ref is the platform's. SECURITY DEFINER: the daemon role may delete no
-- assignment itself (least privilege, db/access.py); through this only platform placements,
-- which the next pass makes again while they are runnable. Raises when `token` is no longer
-- the gate's (another pass took over).
CREATE FUNCTION attune_sensor.sync_platform_sensors(upserts jsonb, keep text[], token text, lock_key bigint)
RETURNS TABLE (sensor_ref text, change text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF jsonb_typeof(upserts) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'sync_platform_sensors: upserts must be a JSON array';
    END IF;
    PERFORM pg_advisory_xact_lock(lock_key);
    IF NOT EXISTS (SELECT 1 FROM attune_sensor.sync_gate WHERE pass_token = token) THEN
        RAISE EXCEPTION 'sync_platform_sensors: another sync pass took over' USING ERRCODE = 'lock_not_available';
    END IF;
    RETURN QUERY
    WITH d AS (
        SELECT x.sensor_ref, x.runtime, coalesce(x.selector, '{}') AS selector,
               coalesce(x.tolerations, '[]') AS tolerations, coalesce(x.affinity, '{}') AS affinity,
               x.versions, x.entrypoint, x.triggers
          FROM jsonb_to_recordset(upserts) AS x(sensor_ref text, runtime text, selector jsonb, tolerations jsonb,
                                                affinity jsonb, versions jsonb, entrypoint text, triggers jsonb)
    ), manual AS (
        SELECT a.sensor_ref FROM attune_sensor.assignment AS a
         WHERE a.origin = 'manual' AND a.sensor_ref IN (SELECT d.sensor_ref FROM d)
    ), upserted AS (
        INSERT INTO attune_sensor.assignment AS a (sensor_ref, runtime, selector, tolerations, affinity, versions,
                                                   entrypoint, env, triggers, origin)
        SELECT d.sensor_ref, d.runtime, d.selector, d.tolerations, d.affinity, d.versions, d.entrypoint, '{}',
               coalesce(d.triggers, '[]'), 'platform'
          FROM d
        ON CONFLICT (sensor_ref) DO UPDATE
           SET runtime = EXCLUDED.runtime, selector = EXCLUDED.selector, tolerations = EXCLUDED.tolerations,
               affinity = EXCLUDED.affinity, versions = EXCLUDED.versions, entrypoint = EXCLUDED.entrypoint,
               env = EXCLUDED.env,
               triggers = CASE WHEN (SELECT d.triggers FROM d WHERE d.sensor_ref = EXCLUDED.sensor_ref) IS NULL
                               THEN a.triggers ELSE EXCLUDED.triggers END
         WHERE a.origin = 'platform'
           AND ((a.runtime, a.selector, a.tolerations, a.affinity, a.versions, a.entrypoint, a.env) IS DISTINCT FROM
                (EXCLUDED.runtime, EXCLUDED.selector, EXCLUDED.tolerations, EXCLUDED.affinity, EXCLUDED.versions,
                 EXCLUDED.entrypoint, EXCLUDED.env)
                OR ((SELECT d.triggers FROM d WHERE d.sensor_ref = EXCLUDED.sensor_ref) IS NOT NULL
                    AND a.triggers IS DISTINCT FROM EXCLUDED.triggers))
        RETURNING a.sensor_ref, a.xmax = 0 AS inserted
    ), removed AS (
        DELETE FROM attune_sensor.assignment AS a
         WHERE keep IS NOT NULL AND a.origin = 'platform'
           AND NOT EXISTS (SELECT 1 FROM unnest(keep) AS k(ref) WHERE k.ref = a.sensor_ref)
        RETURNING a.sensor_ref
    )
    SELECT u.sensor_ref, CASE WHEN u.inserted THEN 'added' ELSE 'changed' END FROM upserted AS u
    UNION ALL
    SELECT m.sensor_ref, 'manual kept' FROM manual AS m
    UNION ALL
    SELECT r.sensor_ref, 'removed' FROM removed AS r;
END $$;
REVOKE EXECUTE ON FUNCTION attune_sensor.sync_platform_sensors(jsonb, text[], text, bigint) FROM PUBLIC;
