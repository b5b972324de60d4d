"""What the platform wants run: its runnable sensors, each as the placement attune-sensor makes
of it. The platform's own sensor service starts a sensor that is enabled, has an enabled rule on
one of its triggers (`trigger.sensor`), and an entrypoint it can spawn (none with `://`); it runs
`{packs_base_dir}/{pack_ref}/sensors/{entrypoint}` with ATTUNE_SENSOR_TRIGGERS, the enabled rules
of its triggers as [{id, ref, config: trigger_params}] (triggers by ref, rules by id)
(sensor_manager.rs at 9206d41). Their ids in one statement, then CHUNK of them at a time in
full; every value bounded before Python sees it.
"""

import json
import re
import unicodedata
from dataclasses import dataclass

from . import rules
from ..runner import launch

MAX_SENSORS = 100_000  # a pass reads at most this many runnable sensors (more: it changes nothing)
CHUNK = 500  # sensors read and written per call: at most 64 MiB of trigger instances at once
MAX_TRIGGERS_BYTES = 131072  # ATTUNE_SENSOR_TRIGGERS, as the assignment's CHECK bounds it
MAX_PLACEMENT_BYTES = 65536  # each of worker_selector, worker_tolerations, worker_affinity
MAX_VERSIONS = 1000  # registered versions read per runtime
MAX_REF = 255  # as the assignment's sensor_ref
RUNTIME_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,31}$")  # the assignment's assignment_runtime_name

# The runnable sensors' ids, in ref order: one semi-join (the platform has no index on
# trigger.sensor: a per-sensor subquery would scan every trigger for every sensor, for minutes
# at 10,000 sensors and whatever the statistics say).
RUNNABLE_IDS_SQL = """
SELECT s.id FROM sensor AS s
 WHERE s.enabled AND position('://' IN s.entrypoint) = 0
   AND s.id IN (SELECT tr.sensor FROM trigger AS tr JOIN rule AS ru ON ru.trigger = tr.id AND ru.enabled
                 WHERE tr.sensor IS NOT NULL)
 ORDER BY s.ref
 LIMIT %(limit)s
"""
# A chunk of them in full, each table read once. Its trigger instances come only when they
# differ from what its placement holds (the pass sends only what changed: rule parameters may
# be 128 KiB per sensor), with whether they are over the bound either way.
RUNNABLE_SQL = """
WITH instances AS MATERIALIZED (
    SELECT tr.sensor,
           jsonb_agg(jsonb_build_object('id', ru.id, 'ref', ru.ref, 'config', coalesce(ru.trigger_params, '{}'::jsonb))
                     ORDER BY tr.ref, ru.id) AS j
      FROM trigger AS tr JOIN rule AS ru ON ru.trigger = tr.id AND ru.enabled
     WHERE tr.sensor = ANY(%(ids)s::bigint[])
     GROUP BY tr.sensor
), versions AS MATERIALIZED (
    SELECT v.runtime, array_agg(left(v.version, 64) ORDER BY v.id) AS registered
      FROM (SELECT rv.runtime, rv.version, rv.id,
                   row_number() OVER (PARTITION BY rv.runtime ORDER BY rv.id) AS n
              FROM runtime_version AS rv WHERE rv.available) AS v
     WHERE v.n <= %(versions_max)s
     GROUP BY v.runtime
)
SELECT s.id, left(s.ref, %(ref_max)s + 1), left(s.pack_ref, 4097), left(s.entrypoint, 4097),
       left(s.runtime_version_constraint, 1025),
       -- as text: parsed here one by one, so that one hostile value costs only its own sensor
       CASE WHEN octet_length(s.worker_selector::text) <= %(placement_max)s THEN s.worker_selector::text END,
       CASE WHEN octet_length(s.worker_tolerations::text) <= %(placement_max)s THEN s.worker_tolerations::text END,
       CASE WHEN octet_length(s.worker_affinity::text) <= %(placement_max)s THEN s.worker_affinity::text END,
       octet_length(s.worker_selector::text) <= %(placement_max)s
           AND octet_length(s.worker_tolerations::text) <= %(placement_max)s
           AND octet_length(s.worker_affinity::text) <= %(placement_max)s AS placement_bounded,
       left(r.ref, 256), left(r.name, 256), ARRAY(SELECT left(x, 64) FROM unnest(r.aliases[1:64]) AS x),
       coalesce(versions.registered, '{}'),
       octet_length(i.j::text) <= %(triggers_max)s AS triggers_bounded,
       CASE WHEN a.triggers IS DISTINCT FROM i.j THEN i.j::text END AS triggers
  FROM sensor AS s
  JOIN instances AS i ON i.sensor = s.id  -- an enabled rule on one of its triggers
  JOIN runtime AS r ON r.id = s.runtime
  LEFT JOIN versions ON versions.runtime = r.id
  LEFT JOIN attune_sensor.assignment AS a ON a.sensor_ref = s.ref AND a.origin = 'platform'
 WHERE s.id = ANY(%(ids)s::bigint[]) AND s.enabled AND position('://' IN s.entrypoint) = 0
 ORDER BY s.ref
"""

KNOWN_SQL = "SELECT EXISTS (SELECT 1 FROM sensor WHERE ref = %(ref)s)"


@dataclass(frozen=True)
class Placement:
    """A runnable platform sensor as an assignment (the sync function's `desired` entry)."""
    sensor_ref: str
    runtime: str
    selector: dict
    tolerations: list
    affinity: dict
    versions: dict  # {names, accept}, or None: any version
    entrypoint: str
    triggers: str  # JSON text; None: as its placement holds them (unchanged)

    def as_json(self):
        """The entry as JSON text; the trigger instances go as PostgreSQL wrote them (never parsed
        here: rule parameters are the platform's, of any shape and depth)."""
        head = json.dumps({"sensor_ref": self.sensor_ref, "runtime": self.runtime, "selector": self.selector,
                           "tolerations": self.tolerations, "affinity": self.affinity, "versions": self.versions,
                           "entrypoint": self.entrypoint}, separators=(",", ":"))
        return head if self.triggers is None else head[:-1] + ',"triggers":' + self.triggers + "}"


def runnable_ids(db):
    """The ids of the platform's runnable sensors in ref order, at most MAX_SENSORS + 1."""
    return [row[0] for row in db.execute(RUNNABLE_IDS_SQL, {"limit": MAX_SENSORS + 1})]


def runnable(db, ids):
    """(placements, refused, defaulted) for the sensors `ids` (a chunk of runnable_ids): those
    still runnable as Placement (by ref), those that cannot run on any worker ([(ref, why)]),
    and those whose placement value the platform would read as its default ([(ref, why)])."""
    rows = db.execute(RUNNABLE_SQL, {"ids": list(ids), "ref_max": MAX_REF, "placement_max": MAX_PLACEMENT_BYTES,
                                     "versions_max": MAX_VERSIONS, "triggers_max": MAX_TRIGGERS_BYTES})
    placements, refused, defaulted = [], [], []
    for row in rows:
        try:
            placement, fallbacks = _placement(*row)
        except rules.RuleError as exc:
            refused.append((row[1], str(exc)))
            continue
        placements.append(placement)
        defaulted += [(placement.sensor_ref, why) for why in fallbacks]
    return placements, refused, defaulted


def _placement(sensor_id, ref, pack_ref, entrypoint, constraint, selector, tolerations, affinity, bounded,
               runtime_ref, runtime_name, aliases, registered, triggers_bounded, triggers):
    # what the assignment's CHECKs refuse, refused here first (a row they refused would fail the
    # whole write): a control character is any of Unicode's (C0, DEL and C1: category Cc)
    if len(ref) > MAX_REF or any(unicodedata.category(c) == "Cc" for c in ref):
        raise rules.RuleError(f"its ref is over {MAX_REF} characters or holds a control character")
    if not bounded:
        raise rules.RuleError(f"its worker_selector, worker_tolerations or worker_affinity is over "
                              f"{MAX_PLACEMENT_BYTES} bytes")
    if not triggers_bounded:
        raise rules.RuleError(f"its trigger instances (ATTUNE_SENSOR_TRIGGERS) are over {MAX_TRIGGERS_BYTES} bytes")
    if not pack_ref:
        raise rules.RuleError("it has no pack_ref (the platform refuses to start it too)")
    path = f"{pack_ref}/sensors/{entrypoint}"
    if path.startswith("/"):  # the platform joins it under packs_base_dir whatever it holds
        raise rules.RuleError(f"its pack_ref {pack_ref[:80]!r} is an absolute path")
    try:
        launch.check_entrypoint_text(path)
    except launch.LaunchRefused as exc:
        raise rules.RuleError(f"its script {path[:200]!r}: {exc}") from None
    names = rules.runtime_names(runtime_name, aliases)
    kind = rules.runtime_kind(names)
    if kind is None or not RUNTIME_NAME_RE.fullmatch(kind):
        raise rules.RuleError(f"its runtime {runtime_ref!r} has no name a worker can offer")
    fallbacks = []
    parsed = {}
    for field, value, parse, default in (("worker_selector", selector, rules.parse_selector, {}),
                                         ("worker_tolerations", tolerations, rules.parse_tolerations, []),
                                         ("worker_affinity", affinity, rules.parse_affinity, {})):
        value = _json(value, field)  # unreadable: refused, not read as a default (the platform cannot load it)
        try:
            parsed[field] = parse(value)
        except rules.RuleError as exc:
            parsed[field] = default
            fallbacks.append(f"{exc}: the platform reads it as no {field}")
    accept = rules.versions_for(constraint, list(registered or []))
    return Placement(sensor_ref=ref, runtime=kind, selector=parsed["worker_selector"],
                     tolerations=parsed["worker_tolerations"], affinity=parsed["worker_affinity"],
                     # always set: it says "the platform's", which only a worker of this version runs
                     versions={"platform": True, "names": names, "accept": accept},
                     entrypoint=path, triggers=triggers), fallbacks


def _json(text, field):
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise rules.RuleError(f"{field} is nested too deeply to read") from None


def known(db, ref):
    """Whether the platform has a sensor of this ref (runnable or not)."""
    return bool(db.execute(KNOWN_SQL, {"ref": ref})[0][0])
