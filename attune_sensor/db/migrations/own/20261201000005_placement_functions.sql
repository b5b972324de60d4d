-- idempotent: `migrate run` applies this file again when one of its functions is missing (repair)
-- The rule of eligibility as named functions, and placement as functions the server keeps
-- (docs/design.md, "Placement at scale"; docs/scheduling.md, "The rule of eligibility").
--
-- Each test of the rule is one function below; placement/scheduler.py's CHECKS call them (one
-- column each, so a refusal still names the first test no worker passed), and the placement
-- functions call them too: the rule is written once, here. A placement sent as one statement was
-- planned afresh every time, about 2.5 ms at 10,000 workers against 0.4 ms to run, and planned
-- while it held the placement lock: PL/pgSQL plans each statement once per session (per server
-- connection: PgBouncer's transaction pooling too) and the statement sent is a short call.
--
-- Speed: a SQL function whose body holds a sub-SELECT is never inlined, and PostgreSQL 15 plans
-- such a function at every call. So each test below is a one-expression SQL function the
-- planner inlines into the statement that calls it, with the cheap case first; where a list
-- must be searched (taints, the assignments), it calls a PL/pgSQL function, whose plan is kept.
--
-- Both flavours: the worker table is named unqualified and found through the caller's
-- search_path (as attune_sensor.heartbeat, migration 4); the platform's `cordoned` column is read
-- from the row as JSON, so one body serves the spec's table, which has none. SECURITY INVOKER:
-- the caller's own grants apply.

-- The platform's rules as SQL the server keeps (scheduling.rs, runtime_detection.rs,
-- version_matching.rs at 9206d41), for the placement walk (placement/scheduler.py CHECKS).
-- platform/rules.py is their Python side; tests hold the two to the same answers.

-- runtime_detection::normalize_runtime_name
CREATE OR REPLACE FUNCTION attune_sensor.runtime_name(name text) RETURNS text
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
CREATE OR REPLACE FUNCTION attune_sensor.worker_labels(capabilities jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE WHEN jsonb_typeof(capabilities -> 'labels') IS DISTINCT FROM 'object' THEN '{}'::jsonb
            WHEN jsonb_path_exists(capabilities -> 'labels', 'strict $.* ? (@.type() != "string")') THEN '{}'::jsonb
            ELSE capabilities -> 'labels' END
$$;

-- selector_term_matches: every match_label, every expression.
CREATE OR REPLACE FUNCTION attune_sensor.term_matches(labels jsonb, term jsonb) RETURNS boolean
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
CREATE OR REPLACE FUNCTION attune_sensor.affinity_allows(labels jsonb, affinity jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT (jsonb_array_length(coalesce(affinity -> 'required', '[]'::jsonb)) = 0
        OR EXISTS (SELECT 1 FROM jsonb_array_elements(affinity -> 'required') AS t(term)
                    WHERE attune_sensor.term_matches(labels, t.term)))
   AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(affinity -> 'anti_affinity', '[]'::jsonb)) AS t(term)
                    WHERE attune_sensor.term_matches(labels, t.term))
$$;

-- preferred_affinity_score: the weights of the preferred terms a worker's labels match.
CREATE OR REPLACE FUNCTION attune_sensor.affinity_score(labels jsonb, affinity jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT coalesce(sum((p.x ->> 'weight')::bigint), 0)
  FROM jsonb_array_elements(coalesce(affinity -> 'preferred', '[]'::jsonb)) AS p(x)
 WHERE attune_sensor.term_matches(labels, p.x -> 'preference')
$$;

-- version_matching::parse_version, reduced to what a worker's version is compared by:
-- major.minor, or NULL when it is no version.
CREATE OR REPLACE FUNCTION attune_sensor.version_key(version text) RETURNS text
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
CREATE OR REPLACE FUNCTION attune_sensor.offers_version(capabilities jsonb, want jsonb) RETURNS boolean
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
CREATE OR REPLACE FUNCTION attune_sensor.sync_platform_sensors(upserts jsonb, keep text[], token text, lock_key bigint)
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

-- A row placement may use: a sensor or hybrid worker that is not the platform's own sensor
-- service's row (fleet.PLACEABLE_ROLES, docs/design.md "Only our rows are ours").
CREATE OR REPLACE FUNCTION attune_sensor.placeable(role TEXT, meta JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT role IN ('sensor', 'hybrid')
   AND NOT (role = 'sensor' AND NOT coalesce(jsonb_typeof(meta -> 'instance_id') = 'string', false)
            AND (meta IS NULL OR CASE WHEN jsonb_typeof(meta) = 'object'
                                      THEN meta ? 'reaped_at' AND meta - ARRAY['reaped_at', 'reaped_by',
                                           'reaped_last_heartbeat']::text[] = '{}'::jsonb
                                      ELSE false END))
$$;

-- 1. alive: active, and not stale by its own interval (attune_sensor.is_stale, migration 4).
CREATE OR REPLACE FUNCTION attune_sensor.alive(status TEXT, beat TIMESTAMPTZ, caps JSONB, multiplier FLOAT8)
RETURNS BOOLEAN LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT status = 'active' AND NOT attune_sensor.is_stale(beat, caps, multiplier)
$$;

-- 2. schedulable: not cordoned, health absent, healthy or degraded.
CREATE OR REPLACE FUNCTION attune_sensor.schedulable(cordoned BOOLEAN, caps JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT NOT coalesce(cordoned, false)
   AND coalesce(caps -> 'health' ->> 'status', 'healthy') IN ('healthy', 'degraded')
$$;

-- 3. runtime: the worker offers it.
CREATE OR REPLACE FUNCTION attune_sensor.offers_runtime(caps JSONB, runtime TEXT) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT jsonb_typeof(caps -> 'runtimes') = 'array' AND caps -> 'runtimes' ? runtime
$$;

-- 4. selector: the worker's labels hold every key=value of it.
CREATE OR REPLACE FUNCTION attune_sensor.selector_holds(caps JSONB, selector JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT attune_sensor.worker_labels(caps) @> selector
$$;

-- Whether `tolerations` tolerate `taint` (the platform's toleration_matches_taint): the same key
-- always, the same effect when one is named, and with `equal` the same value.
CREATE OR REPLACE FUNCTION attune_sensor.tolerates(tolerations JSONB, taint JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT EXISTS (
    SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(tolerations) = 'array' THEN tolerations
                                            ELSE '[]'::jsonb END) AS tol(x)
     WHERE tol.x ->> 'key' = taint ->> 'key'
       AND (tol.x ->> 'effect' IS NULL OR tol.x ->> 'effect' = coalesce(taint ->> 'effect', 'no_schedule'))
       AND (coalesce(tol.x ->> 'operator', 'equal') = 'exists'
            OR (tol.x ->> 'value') IS NOT DISTINCT FROM (taint ->> 'value')))
$$;

-- Whether the worker has a taint of `effect` that `tolerations` do not tolerate (an absent effect
-- is no_schedule).
CREATE OR REPLACE FUNCTION attune_sensor.untolerated_taint(caps JSONB, tolerations JSONB, effect TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN EXISTS (
        SELECT 1 FROM jsonb_array_elements(caps -> 'taints') AS t(x)
         WHERE coalesce(t.x ->> 'effect', 'no_schedule') = effect
           AND NOT attune_sensor.tolerates(tolerations, t.x));
END $$;

-- 5. tolerated: every no_schedule taint of the worker is tolerated.
CREATE OR REPLACE FUNCTION attune_sensor.tolerated(caps JSONB, tolerations JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT jsonb_typeof(caps -> 'taints') IS DISTINCT FROM 'array' OR caps -> 'taints' = '[]'::jsonb
    OR NOT attune_sensor.untolerated_taint(caps, tolerations, 'no_schedule')
$$;

-- Ranks a worker lower: it has a prefer_no_schedule taint the sensor does not tolerate.
CREATE OR REPLACE FUNCTION attune_sensor.penalized(caps JSONB, tolerations JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT jsonb_typeof(caps -> 'taints') = 'array' AND caps -> 'taints' <> '[]'::jsonb
   AND attune_sensor.untolerated_taint(caps, tolerations, 'prefer_no_schedule')
$$;

-- 6. affinity: the platform's required and anti-affinity terms (the functions above).
CREATE OR REPLACE FUNCTION attune_sensor.affinity_holds(caps JSONB, affinity JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT affinity = '{}'::jsonb OR attune_sensor.affinity_allows(attune_sensor.worker_labels(caps), affinity)
$$;

-- 7. version: for one of the platform's sensors ({platform: true, names, accept}), a worker whose
-- code runs them as placed (it states the own schema it speaks, 20261201000003 or later: a
-- daemon of an earlier version during an upgrade would run it without its trigger instances)
-- and, with a runtime_version_constraint (accept), a version it accepts.
CREATE OR REPLACE FUNCTION attune_sensor.version_holds(caps JSONB, versions JSONB) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT versions IS NULL
    OR ((versions -> 'platform' IS DISTINCT FROM 'true'::jsonb
         OR CASE WHEN jsonb_typeof(caps -> 'attune_sensor_schema') = 'number'
                 THEN (caps -> 'attune_sensor_schema')::numeric >= 20261201000003 ELSE false END)
        AND (jsonb_typeof(versions -> 'accept') IS DISTINCT FROM 'array'
             OR attune_sensor.offers_version(caps, versions)))
$$;

-- A worker's capacity (schema.capacity_of, which the read side uses without this schema): a
-- whole number from 0 to 1,000,000 in max_concurrent_sensors, 0 for anything else.
CREATE OR REPLACE FUNCTION attune_sensor.capacity(caps JSONB) RETURNS INTEGER
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE WHEN jsonb_typeof(caps -> 'max_concurrent_sensors') IS DISTINCT FROM 'number' THEN 0
            WHEN (caps -> 'max_concurrent_sensors')::numeric BETWEEN 0 AND 1000000
             AND (caps -> 'max_concurrent_sensors')::numeric = trunc((caps -> 'max_concurrent_sensors')::numeric)
            THEN (caps -> 'max_concurrent_sensors')::numeric::int ELSE 0 END
$$;

-- 8. capacity: fewer sensors placed on it than its capacity, counted from the assignments.
CREATE OR REPLACE FUNCTION attune_sensor.has_room(worker_id BIGINT, caps JSONB) RETURNS BOOLEAN
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    RETURN (SELECT count(*) FROM attune_sensor.assignment AS a WHERE a.worker_id = has_room.worker_id)
           < attune_sensor.capacity(caps);
END $$;

-- A worker that reported the sensor's process as running and is not stale: the previous worker
-- a new placement waits for (docs/design.md, "At most one copy").
CREATE OR REPLACE FUNCTION attune_sensor.still_running(ref TEXT, multiplier FLOAT8) RETURNS BIGINT
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT r.worker_id FROM attune_sensor.sensor_run AS r JOIN worker AS p ON p.id = r.worker_id
             WHERE r.sensor_ref = ref AND r.status IN ('starting', 'running', 'backoff', 'stopping')
               AND NOT attune_sensor.is_stale(p.last_heartbeat, p.capabilities, multiplier)
             LIMIT 1);
END $$;

-- Every test of the rule at once, for worker row `w` (its columns, so that one body serves both
-- flavours' row types) and a sensor's settings: what the walks, `rebalance_moves` and the
-- guards ask. One expression without a sub-SELECT: the planner inlines it.
CREATE OR REPLACE FUNCTION attune_sensor.eligible(w_id BIGINT, w_role TEXT, w_meta JSONB, w_status TEXT,
                                                  w_beat TIMESTAMPTZ, w_caps JSONB, w_cordoned BOOLEAN,
                                                  runtime TEXT, selector JSONB, tolerations JSONB, affinity JSONB,
                                                  versions JSONB, multiplier FLOAT8)
RETURNS BOOLEAN LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT attune_sensor.placeable(w_role, w_meta)
   AND attune_sensor.alive(w_status, w_beat, w_caps, multiplier)
   AND attune_sensor.schedulable(w_cordoned, w_caps)
   AND attune_sensor.offers_runtime(w_caps, runtime)
   AND attune_sensor.selector_holds(w_caps, selector)
   AND attune_sensor.tolerated(w_caps, tolerations)
   AND attune_sensor.affinity_holds(w_caps, affinity)
   AND attune_sensor.version_holds(w_caps, versions)
   AND attune_sensor.has_room(w_id, w_caps)
$$;

-- The walk: the worker a sensor goes to (none: no row). worker_load's index for its runtime in
-- ratio order, the first eligible worker without an untolerated prefer_no_schedule taint, else
-- the first with one; for a sensor with preferred affinity terms, every eligible worker scored
-- by the weights of the terms it matches, then taint, then load. OFFSET 0 keeps the planner from
-- flattening the per-worker test into a join (it would scan every worker of the runtime).
CREATE OR REPLACE FUNCTION attune_sensor.choose_worker(p_runtime TEXT, p_selector JSONB, p_tolerations JSONB,
                                                       p_affinity JSONB, p_versions JSONB, p_multiplier FLOAT8)
RETURNS TABLE (id BIGINT, name TEXT) LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    IF jsonb_array_length(coalesce(p_affinity -> 'preferred', '[]'::jsonb)) = 0 THEN
        RETURN QUERY
        (SELECT c.id, c.name FROM attune_sensor.worker_load AS l
          CROSS JOIN LATERAL (SELECT w.id, w.name FROM worker AS w
                               WHERE w.id = l.worker_id
                                 AND attune_sensor.eligible(w.id, w.worker_role::text, w.meta, w.status::text, w.last_heartbeat,
                                                             w.capabilities, (to_jsonb(w) ->> 'cordoned')::boolean, p_runtime, p_selector,
                                                             p_tolerations, p_affinity, p_versions, p_multiplier)
                                 AND NOT attune_sensor.penalized(w.capabilities, p_tolerations)
                              OFFSET 0) AS c
          WHERE l.runtime = p_runtime
          ORDER BY l.ratio, l.worker_id LIMIT 1)
        UNION ALL
        (SELECT c.id, c.name FROM attune_sensor.worker_load AS l
          CROSS JOIN LATERAL (SELECT w.id, w.name FROM worker AS w
                               WHERE w.id = l.worker_id
                                 AND attune_sensor.eligible(w.id, w.worker_role::text, w.meta, w.status::text, w.last_heartbeat,
                                                             w.capabilities, (to_jsonb(w) ->> 'cordoned')::boolean, p_runtime, p_selector,
                                                             p_tolerations, p_affinity, p_versions, p_multiplier)
                                 AND attune_sensor.penalized(w.capabilities, p_tolerations)
                              OFFSET 0) AS c
          WHERE l.runtime = p_runtime
          ORDER BY l.ratio, l.worker_id LIMIT 1)
        LIMIT 1;
    ELSE
        RETURN QUERY
        SELECT c.id, c.name FROM attune_sensor.worker_load AS l
         CROSS JOIN LATERAL (SELECT w.id, w.name,
                                    attune_sensor.affinity_score(attune_sensor.worker_labels(w.capabilities),
                                                                 p_affinity) AS score,
                                    attune_sensor.penalized(w.capabilities, p_tolerations) AS penalized
                               FROM worker AS w
                              WHERE w.id = l.worker_id
                                AND attune_sensor.eligible(w.id, w.worker_role::text, w.meta, w.status::text, w.last_heartbeat,
                                                            w.capabilities, (to_jsonb(w) ->> 'cordoned')::boolean, p_runtime, p_selector,
                                                            p_tolerations, p_affinity, p_versions, p_multiplier)
                             OFFSET 0) AS c
         WHERE l.runtime = p_runtime
         ORDER BY c.score DESC, c.penalized, l.ratio, l.worker_id LIMIT 1;
    END IF;
END $$;

-- `attune-sensor place`: under the placement lock, the sensor placed where choose_worker says
-- (pending when nowhere), or left as it is when it is placed already. Returns the worker's name
-- (where it is, if placed before) and, when it was placed before with other settings, those
-- settings (the caller refuses: unplace first).
CREATE OR REPLACE FUNCTION attune_sensor.place_sensor(p_ref TEXT, p_runtime TEXT, p_selector JSONB,
                                                      p_tolerations JSONB, p_entrypoint TEXT, p_env JSONB,
                                                      p_multiplier FLOAT8, p_lock BIGINT,
                                                      OUT worker_name TEXT, OUT placed_with JSONB)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    chosen_id BIGINT;
    chosen_name TEXT;
    existing attune_sensor.assignment%ROWTYPE;
BEGIN
    -- the walk under the lock: walking before it let concurrent placers pile onto the same least
    -- loaded worker (balance 1.20 against 1.10 at 100,000 sensors, for 12 % more placements a
    -- second: docs/performance.md, section 7)
    PERFORM pg_advisory_xact_lock(p_lock);
    SELECT * INTO existing FROM attune_sensor.assignment WHERE sensor_ref = p_ref;
    IF FOUND AND existing.worker_id IS NOT NULL THEN
        SELECT w.name INTO worker_name FROM worker AS w WHERE w.id = existing.worker_id;
        IF (existing.runtime, existing.selector, existing.tolerations, existing.entrypoint, existing.env)
           IS DISTINCT FROM (p_runtime, p_selector, p_tolerations, p_entrypoint, p_env) THEN
            placed_with := jsonb_build_object('runtime', existing.runtime, 'selector', existing.selector,
                                              'tolerations', existing.tolerations,
                                              'entrypoint', existing.entrypoint, 'env', existing.env);
        END IF;
        RETURN;
    END IF;
    SELECT c.id, c.name INTO chosen_id, chosen_name
      FROM attune_sensor.choose_worker(p_runtime, p_selector, p_tolerations, '{}'::jsonb, NULL, p_multiplier) AS c;
    INSERT INTO attune_sensor.assignment AS a (sensor_ref, runtime, selector, tolerations, entrypoint, env,
                                               worker_id, assigned_at, previous_worker_id)
    VALUES (p_ref, p_runtime, p_selector, p_tolerations, p_entrypoint, p_env, chosen_id,
            CASE WHEN chosen_id IS NOT NULL THEN now() END, attune_sensor.still_running(p_ref, p_multiplier))
    ON CONFLICT (sensor_ref) DO UPDATE
       SET runtime = EXCLUDED.runtime, selector = EXCLUDED.selector, tolerations = EXCLUDED.tolerations,
           entrypoint = EXCLUDED.entrypoint, env = EXCLUDED.env, worker_id = EXCLUDED.worker_id,
           assigned_at = EXCLUDED.assigned_at;
    worker_name := chosen_name;
END $$;

-- A failover pass's placement of one pending sensor, as it is now (a sensor unplaced or placed
-- since the pass read the pending list is left alone). The caller holds the placement lock for
-- the whole batch. Returns the worker's name, NULL when it stays pending.
CREATE OR REPLACE FUNCTION attune_sensor.place_queued(p_ref TEXT, p_multiplier FLOAT8) RETURNS TEXT
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    pending attune_sensor.assignment%ROWTYPE;
    chosen_id BIGINT;
    chosen_name TEXT;
BEGIN
    SELECT * INTO pending FROM attune_sensor.assignment WHERE sensor_ref = p_ref AND worker_id IS NULL;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT c.id, c.name INTO chosen_id, chosen_name
      FROM attune_sensor.choose_worker(pending.runtime, pending.selector, pending.tolerations, pending.affinity,
                                       pending.versions, p_multiplier) AS c;
    IF chosen_id IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE attune_sensor.assignment
       SET worker_id = chosen_id, assigned_at = now(),
           previous_worker_id = coalesce(previous_worker_id, attune_sensor.still_running(p_ref, p_multiplier))
     WHERE sensor_ref = p_ref AND worker_id IS NULL;
    RETURN chosen_name;
END $$;

-- Rebalance (docs/scheduling.md, "Commands and API"): moves that each leave the fleet strictly
-- more even, in rounds. A round takes the 20 fullest schedulable workers by their counted
-- sensors (found through this index on the load counter, then counted: the counter only
-- chooses whom to look at) and moves at most one sensor from each, to the least loaded worker
-- eligible for it, when that worker would then hold a strictly lower share than the source held
-- before the move. Rounds go on until one moves nothing or `p_limit` moves were made. A sensor
-- with preferred affinity terms is not moved (its preferences placed it). One call, one lock,
-- plans kept: a move costs a walk, not a statement's planning.
CREATE INDEX IF NOT EXISTS worker_load_fullest ON attune_sensor.worker_load (ratio DESC, worker_id);

CREATE OR REPLACE FUNCTION attune_sensor.rebalance_moves(p_multiplier FLOAT8, p_limit INTEGER, p_lock BIGINT)
RETURNS TABLE (moved_ref TEXT, from_worker TEXT, to_worker TEXT) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    source RECORD;
    move RECORD;
    moves INTEGER := 0;
    progress BOOLEAN;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    LOOP
        progress := false;
        FOR source IN
            SELECT w.id, w.name, c.load, c.capacity
              FROM (SELECT DISTINCT l.worker_id
                      FROM (SELECT worker_id FROM attune_sensor.worker_load ORDER BY ratio DESC, worker_id LIMIT 60) AS l
                   ) AS top
              JOIN worker AS w ON w.id = top.worker_id
             CROSS JOIN LATERAL (SELECT (SELECT count(*) FROM attune_sensor.assignment AS a WHERE a.worker_id = w.id) AS load,
                                        attune_sensor.capacity(w.capabilities) AS capacity) AS c
             WHERE attune_sensor.schedulable((to_jsonb(w) ->> 'cordoned')::boolean, w.capabilities)
               AND c.load > 0 AND c.capacity > 0
             ORDER BY c.load::float8 / c.capacity DESC, w.id
             LIMIT 20
        LOOP
            EXIT WHEN moves >= p_limit;
            SELECT a.sensor_ref, d.id AS target_id, d.name AS target_name INTO move
              FROM attune_sensor.assignment AS a
             CROSS JOIN LATERAL (
                 SELECT t.id, t.name, t.ratio_after FROM attune_sensor.worker_load AS l
                  CROSS JOIN LATERAL (
                      SELECT w.id, w.name,
                             ((SELECT count(*) FROM attune_sensor.assignment AS x WHERE x.worker_id = w.id) + 1)::float8
                                 / attune_sensor.capacity(w.capabilities) AS ratio_after
                        FROM worker AS w
                       WHERE w.id = l.worker_id AND w.id <> source.id
                         AND attune_sensor.eligible(w.id, w.worker_role::text, w.meta, w.status::text, w.last_heartbeat,
                                                     w.capabilities, (to_jsonb(w) ->> 'cordoned')::boolean, a.runtime, a.selector,
                                                     a.tolerations, a.affinity, a.versions, p_multiplier)
                      OFFSET 0) AS t
                  WHERE l.runtime = a.runtime
                  ORDER BY l.ratio, l.worker_id LIMIT 1) AS d
             WHERE a.worker_id = source.id
               AND jsonb_array_length(coalesce(a.affinity -> 'preferred', '[]'::jsonb)) = 0
               AND d.ratio_after < source.load::float8 / source.capacity - 1e-9
             ORDER BY d.ratio_after, a.sensor_ref
             LIMIT 1;
            CONTINUE WHEN NOT FOUND;
            UPDATE attune_sensor.assignment AS a
               SET worker_id = move.target_id, assigned_at = now(),
                   previous_worker_id = coalesce(a.previous_worker_id, source.id)
             WHERE a.sensor_ref = move.sensor_ref AND a.worker_id = source.id;
            moved_ref := move.sensor_ref;
            from_worker := source.name;
            to_worker := move.target_name;
            RETURN NEXT;
            moves := moves + 1;
            progress := true;
        END LOOP;
        EXIT WHEN NOT progress OR moves >= p_limit;
    END LOOP;
END $$;

-- Whoever writes a placement (a daemon of an earlier version during a rolling upgrade, whose
-- rule knows no affinity or version constraint, or any program), one of the platform's sensors
-- is only ever put on a worker that passes its affinity and version tests: a write that would
-- do otherwise is skipped, and the sensor stays where it was (pending).
CREATE OR REPLACE FUNCTION attune_sensor.guard_platform_placement() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM worker AS w
                WHERE w.id = NEW.worker_id
                  AND attune_sensor.affinity_holds(w.capabilities, NEW.affinity)
                  AND attune_sensor.version_holds(w.capabilities, NEW.versions)) THEN
        RETURN NEW;
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS guard_platform_placement ON attune_sensor.assignment;
CREATE TRIGGER guard_platform_placement BEFORE UPDATE OF worker_id ON attune_sensor.assignment
    FOR EACH ROW WHEN (NEW.worker_id IS NOT NULL AND NEW.worker_id IS DISTINCT FROM OLD.worker_id
                       AND NEW.origin = 'platform')
    EXECUTE FUNCTION attune_sensor.guard_platform_placement();

-- Only the sync function (which runs as the schema's owner) sets a placement's origin: a daemon
-- host's role may insert and update placements (`place`, its worker's own), but never make a
-- manual placement the platform's, which a pass would then delete (docs/design.md, "The
-- platform's sensors"). A trigger rather than column grants: daemons of earlier versions check
-- the table-wide privilege at start, and a rolling upgrade must not stop them.
CREATE OR REPLACE FUNCTION attune_sensor.guard_origin() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_OP = 'INSERT' AND NEW.origin IS DISTINCT FROM 'manual'
        OR TG_OP = 'UPDATE' AND NEW.origin IS DISTINCT FROM OLD.origin)
       AND NOT pg_catalog.pg_has_role(current_user, (SELECT relowner FROM pg_catalog.pg_class
                                          WHERE oid = 'attune_sensor.assignment'::regclass), 'USAGE') THEN
        RAISE EXCEPTION 'only attune_sensor.sync_platform_sensors sets a placement''s origin'
              USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS guard_origin ON attune_sensor.assignment;
CREATE TRIGGER guard_origin BEFORE INSERT OR UPDATE OF origin ON attune_sensor.assignment
    FOR EACH ROW EXECUTE FUNCTION attune_sensor.guard_origin();
