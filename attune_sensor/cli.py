"""The `attune-sensor` command: argparse, wiring, and mapping errors to exit codes.

Every failure is one line on stderr, `attune-sensor: <what went wrong>`, and a sysexits code:
78 for configuration (systemd's RestartPreventExitStatus), 69 when the database is unreachable,
1 for other failures. `check` follows the monitoring-plugin convention instead: 0 OK,
2 critical, 3 unknown.
"""

import json
import os
import re
import sys

from . import __version__
from . import config as config_module
from .errors import AttuneSensorError, ConfigError, DatabaseUrlMissing, UsageError

CHECK_OK, CHECK_WARNING, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 1, 2, 3
EX_SOFTWARE = 70


# Bounds on what the command line may carry (docs: README, "Commands").
MAX_REF = 255            # a sensor ref, as the scheduler stores it
MAX_WORKER_NAME = 255
MAX_REPEATED = 64        # --selector, --tolerate, --env: each at most this many times
# The template unit's instances (systemd/attune-sensor@.service runs `--instance %i`): the file
# each reads, and the names allowed (they become part of a path and of the worker's name).
INSTANCE_CONFIG = "/etc/attune/sensor-{}.yaml"
INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")


def _one_line(text):
    """`text` with every character that is not printable escaped: one line, whatever it holds."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def _parser():
    import argparse  # here: the daemon's own command line does without it (_run_arguments)

    class _Parser(argparse.ArgumentParser):
        """argparse, but a usage error is one line on stderr (exit 2), like every other error,
        and never echoes a control character it was given."""

        def error(self, message):
            sys.stderr.write(f"attune-sensor: {_one_line(message)} (see '{self.prog} --help')\n")
            sys.exit(2)

    # --config is accepted after the command too (attune-sensor workers --config F); SUPPRESS
    # keeps a subcommand from resetting what was given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="configuration file (default: $ATTUNE_CONFIG, else /etc/attune/config.yaml, else "
                             "/etc/attune/attune.yaml)")
    # --instance NAME: the template unit's instance attune-sensor@NAME (its file and its worker name)
    common.add_argument("--instance", metavar="NAME", default=argparse.SUPPRESS, help="the template unit's instance (attune-sensor@NAME): reads /etc/attune/sensor-NAME.yaml and names the worker sensor-HOSTNAME-NAME")
    parser = _Parser(
        prog="attune-sensor",
        description="Attune sensor worker: registers this host in the shared PostgreSQL worker "
                    "table, sends heartbeats, and deregisters on stop.",
        epilog="Configuration: --config PATH (before or after the command), else $ATTUNE_CONFIG, else "
               "/etc/attune/config.yaml, else /etc/attune/attune.yaml; DATABASE_URL, ATTUNE_API_URL, "
               "ATTUNE_MQ_URL, ATTUNE_PACKS_BASE_DIR and ATTUNE__<SECTION>__<KEY> override the file. Exit codes: "
               "0 ok, 1 failure, 2 usage, 69 database unreachable, 78 configuration error.",
    )
    parser.add_argument("--config", metavar="PATH", help="configuration file (default: $ATTUNE_CONFIG, else "
                                                         "/etc/attune/config.yaml, else /etc/attune/attune.yaml)")
    parser.add_argument("--instance", metavar="NAME", help="the template unit's instance (attune-sensor@NAME): reads /etc/attune/sensor-NAME.yaml and names the worker sensor-HOSTNAME-NAME")
    parser.add_argument("--version", action="version", version=f"attune-sensor {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(subparsers, name, help_text, description, **kwargs):
        return subparsers.add_parser(name, help=help_text, description=description, parents=[common], **kwargs)

    command(commands, "run", "run the daemon: register, heartbeat, deregister on SIGTERM",
            "Run the sensor worker daemon in the foreground (what systemd's ExecStart runs). "
            "SIGTERM/SIGINT deregister and exit 0; SIGHUP reloads the configuration.")

    migrate = command(commands, "migrate", "apply or list database schema migrations",
                      "Manage the worker schema. Needs a role that may run DDL.")
    migrate_commands = migrate.add_subparsers(dest="migrate_command", metavar="ACTION", parser_class=_Parser)
    migrate_commands.required = True
    migrate_run = command(
        migrate_commands, "run", "apply pending migrations and grant the daemon role (safe to run from several hosts at once)",
        "On an empty database or the spec's schema: apply pending migrations. On the Attune "
        "platform's schema: change none of its objects, only grant attune_sensor_daemon what the "
        "daemon needs there. Both: create that role when allowed.")
    migrate_run.add_argument("--tune-heartbeats", action="store_true",
                             help="on the platform's schema, opt in to HOT heartbeats: drop the index on "
                                  "last_heartbeat and lower the fillfactor (see 'migrate info')")
    command(migrate_commands, "info", "the worker table found (flavour, schema), applied and pending migrations, the "
                                      "daemon role, and heartbeat tuning",
            "Print the worker table found (flavour, schema), the applied and pending migrations, the daemon "
            "role and the heartbeat tuning advice. Changes nothing.")
    uninstall = command(migrate_commands, "uninstall", "remove every object attune-sensor made in this database "
                                                       "(says what first)",
                        "Say what attune-sensor made in this database (schema attune_sensor, the spec series' "
                        "bookkeeping, the daemon role's privileges and the role), then, with --yes, remove it in one "
                        "transaction. Never an object of the platform's. Stop every daemon first.")
    uninstall.add_argument("--yes", action="store_true", help="remove what was listed (without it nothing is removed)")
    uninstall.add_argument("--drop-role", action="store_true",
                           help="drop attune_sensor_daemon even when login roles are members of it")

    workers = command(commands, "workers", "list sensor workers of the fleet with a summary",
                      "List sensor (and hybrid) workers: name, host, status, runtimes, "
                      "capacity and heartbeat age, then the fleet summary.")
    workers.add_argument("--runtime", metavar="R", help="only workers offering runtime R (e.g. python)")
    workers.add_argument("--stale", action="store_true", help="only active workers whose heartbeat is overdue")
    workers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    workers.add_argument("--watch", action="store_true",
                         help="after the list, print worker events (registered, deregistered, reaped) as they "
                              "happen, one line each (one JSON object per line with --json), until Ctrl-C")

    command(commands, "check", "monitoring probe for this host's worker (exit 0 OK, 1 warning, 2 critical, 3 unknown)",
            "Check that this host's worker row is active with a recent heartbeat. "
            "Prints one status line; exit 0 OK, 1 WARNING (sensors it could run are pending), 2 CRITICAL, 3 UNKNOWN.")
    command(commands, "metrics", "fleet gauges in the Prometheus text format",
            "Print fleet gauges in the Prometheus text exposition format, for "
            "node_exporter's textfile collector.")
    place = command(commands, "place", "place a sensor on one eligible worker (least loaded)",
                    "Place sensor SENSOR_REF on exactly one eligible sensor worker and print "
                    "its name. Exit 1, saying why, when none is eligible: the sensor stays "
                    "pending and is placed as soon as one is.")
    place.add_argument("sensor_ref", metavar="SENSOR_REF")
    place.add_argument("--runtime", required=True, metavar="R", help="the runtime the sensor needs")
    place.add_argument("--selector", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a label the worker must have (repeatable, at most {MAX_REPEATED})")
    place.add_argument("--tolerate", action="append", default=[], metavar="TAINT",
                       help=f"a taint the sensor tolerates, key[=value][:effect] (repeatable, at most {MAX_REPEATED})")
    place.add_argument("--entrypoint", metavar="PATH",
                       help="the script the worker runs, relative to its packs_base_dir (an absolute path only "
                            "inside it); without it the placement runs nothing (an external runtime's)")
    place.add_argument("--env", action="append", default=[], metavar="K=V",
                       help=f"an environment variable for the sensor (repeatable, at most {MAX_REPEATED}; not PATH, "
                            "LD_*, PYTHON*, NODE_OPTIONS or ATTUNE_*)")
    command(commands, "rebalance", "even out sensors over the eligible workers, moving as few as it can",
            "Move sensors from the most loaded workers (sensors / max_concurrent_sensors) to "
            "eligible less loaded ones, one at a time, only while a move makes the fleet "
            "more even. Prints each move.")
    command(commands, "sync", "place the platform's runnable sensors now (on the Attune platform's database)",
            "Make the placements equal to the Attune platform's runnable sensors now (enabled, an enabled rule on "
            "one of their triggers, an entrypoint without ://), by its own rules: runtime aliases, "
            "worker_selector, worker_tolerations, worker_affinity, runtime_version_constraint. New ones are "
            "placed, those no longer runnable removed; manual placements of other refs are kept. The daemons "
            "do the same about every 10 s. Prints each change and the sensors no worker can run.")
    unplace = command(commands, "unplace", "forget a sensor's placement",
                      "Forget the placement of sensor SENSOR_REF: its worker stops it at its next read. Exit 1 "
                      "when it is not placed.")
    unplace.add_argument("sensor_ref", metavar="SENSOR_REF")
    assignments = command(commands, "assignments", "sensors and the workers they are placed on",
                          "List placed and pending sensors: the worker each is placed on, and the state and pid "
                          "of its process as that worker last reported them.")
    whose = assignments.add_mutually_exclusive_group()
    whose.add_argument("--worker", metavar="NAME", help="only this worker's sensors")
    whose.add_argument("--mine", action="store_true", help="only the sensors of this host's worker "
                                                           "(sensor.worker_name)")
    assignments.add_argument("--pending", action="store_true", help="only sensors waiting for a worker")
    assignments.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show = command(commands, "config", "print the effective configuration, secrets masked (exit 78 if invalid)",
                   "Print the configuration after file, environment and defaults are merged. "
                   "The database password is masked.")
    show.add_argument("--is-configured", action="store_true",
                      help="print nothing; exit 0 once a database URL is set, 1 (saying what to set) before. "
                           "Other errors are left to 'run' to report. The unit's ExecCondition uses it.")
    return parser


# Signals that arrive before the daemon's own handlers are installed (see cmd_run).
_early_signals = []


def _remember_signal(signum, frame):
    _early_signals.append(signum)


def _run_arguments(argv):
    """The daemon's own command lines, as the units and operators write them (`run` with
    `--config`/`--instance` before or after it, the later one winning), read without argparse,
    whose import and parser cost about a tenth of the daemon's start (docs/performance.md,
    section 1). The same namespace argparse would give; None for anything else, which argparse
    then reads (and refuses with its own messages)."""
    from types import SimpleNamespace

    values = {"config": None, "instance": None}
    command = None
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        if token == "run" and command is None:
            command = token
            continue
        name, sep, value = token.partition("=")
        if name not in ("--config", "--instance"):
            return None
        if not sep:
            if not tokens or tokens[0].startswith("-"):
                return None
            value = tokens.pop(0)
        values[name[2:]] = value
    return SimpleNamespace(command="run", **values) if command else None


def main(argv=None):
    # systemctl reload may come before the daemon is up: SIGHUP's default action would kill it.
    import signal

    previous_hup = signal.signal(signal.SIGHUP, _remember_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held since signals.entry_point
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _run_arguments(argv) or _parser().parse_args(argv)
    if args.command != "run":
        signal.signal(signal.SIGHUP, previous_hup)
    try:
        _check_arguments(args)
    except UsageError as exc:
        print(f"attune-sensor: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    handler = {"run": cmd_run, "migrate": cmd_migrate, "workers": cmd_workers, "check": cmd_check,
               "metrics": cmd_metrics, "config": cmd_config, "place": cmd_place, "unplace": cmd_unplace,
               "assignments": cmd_assignments, "rebalance": cmd_rebalance, "sync": cmd_sync}[args.command]
    try:
        return handler(args)
    except AttuneSensorError as exc:
        if args.command == "check":
            print(f"UNKNOWN: {exc}")
            return CHECK_UNKNOWN
        print(f"attune-sensor: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0 if getattr(args, "watch", False) else 130
    except Exception as exc:  # a bug: one line for the operator, no traceback in the journal
        from .config.dsn import redact_dsn

        print(f"attune-sensor: internal error: {type(exc).__name__}: {redact_dsn(' '.join(str(exc).split()))}",
              file=sys.stderr)
        return EX_SOFTWARE


def _load(args):
    """The configuration, as the unit finds it: --config, else for --instance NAME the template
    unit's /etc/attune/sensor-NAME.yaml, else $ATTUNE_CONFIG and the default paths. An instance
    also names the default worker (sensor-{hostname}-NAME), through the environment so that the
    daemon's reloads read it the same way."""
    instance = getattr(args, "instance", None)
    if instance is None:
        return config_module.load(args.config)
    os.environ[config_module.INSTANCE_VARIABLE] = instance
    return config_module.load(args.config or INSTANCE_CONFIG.format(instance))


# --- the command line's values, checked before anything is read or connected ------------------


def _shown(value):
    return ascii(value) if len(value) <= 60 else ascii(value[:57]) + "..."


def _text(value, what, limit):
    """One line of visible characters, valid UTF-8 (argv's undecodable bytes arrive as lone
    surrogates), 1 to `limit` characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} {_shown(value)}: is not valid UTF-8") from None
    if not value or len(value) > limit:
        raise UsageError(f"{what}: must be 1-{limit} characters, got {len(value)}")
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise UsageError(f"{what} {_shown(value)}: holds a control or invisible character (U+{ord(bad):04X})")
    return value


def _pairs(items, what, meaning):
    """KEY=VALUE arguments -> {key: value}, each key once, at most MAX_REPEATED."""
    if len(items) > MAX_REPEATED:
        raise UsageError(f"{what}: given {len(items)} times; at most {MAX_REPEATED}")
    pairs = {}
    for item in items:
        key, sep, value = _text(item, what, 8192).partition("=")
        if not sep:
            raise UsageError(f"{what} {_shown(item)}: expected {meaning}")
        if key in pairs:
            raise UsageError(f"{what}: {_shown(key)} given twice")
        pairs[key] = value
    return pairs


def _runtime(value):
    from .worker.runtimes import normalise

    try:
        names = normalise([_text(value, "--runtime", 64)])
    except ValueError as exc:
        raise UsageError(f"--runtime: {exc}") from None
    if not names:
        raise UsageError("--runtime: a runtime name is needed (e.g. python, shell)")
    return names[0]


def _check_arguments(args):
    """Every value the command line carries, bounded and checked, replaced by its clean form:
    a bad one is a usage error (exit 2) naming it, before any configuration or database."""
    if getattr(args, "sensor_ref", None) is not None:
        _text(args.sensor_ref, "SENSOR_REF", MAX_REF)
    if getattr(args, "worker", None) is not None:
        _text(args.worker, "--worker", MAX_WORKER_NAME)
    if getattr(args, "instance", None) is not None and not INSTANCE_RE.fullmatch(_text(args.instance, "--instance", 64)):
        raise UsageError(f"--instance {_shown(args.instance)}: expected 1-64 letters, digits or . _ @ : - "
                         "(starting with a letter or digit), as in attune-sensor@NAME")
    if args.command == "workers" and args.runtime is not None:
        args.runtime = _runtime(args.runtime)
    if args.command != "place":
        return
    from . import placement
    from .runner import launch
    from .placement.scheduler import toleration

    args.runtime = _runtime(args.runtime)
    args.selector = _pairs(args.selector, "--selector", "KEY=VALUE")
    try:
        for key, value in args.selector.items():
            placement.label_value(value, placement.label_key(key))
    except ValueError as exc:
        raise UsageError(f"--selector: {exc}") from None
    if len(args.tolerate) > MAX_REPEATED:
        raise UsageError(f"--tolerate: given {len(args.tolerate)} times; at most {MAX_REPEATED}")
    for item in args.tolerate:
        try:
            toleration(_text(item, "--tolerate", 512))
        except ValueError as exc:
            raise UsageError(f"--tolerate {_shown(item)}: {exc}") from None
    args.env = _pairs(args.env, "--env", "K=V")
    if args.entrypoint is not None:
        _text(args.entrypoint, "--entrypoint", launch.MAX_ENTRYPOINT)


def cmd_run(args):
    config = _load(args)
    from . import logs
    from .worker.service import SensorService

    logs.setup(config.log.level, config.log.format)
    try:
        service = SensorService(config, config_path=args.config)
    except ValueError as exc:  # ATTUNE_SENSOR_RUNTIMES holds a bad name
        raise ConfigError(str(exc)) from None
    if _early_signals:
        service.reload()  # the file may have changed after we read it
    service.start()
    return 0


def cmd_migrate(args):
    config = _load(args)
    from .db import migrations

    if args.migrate_command == "info":
        for what, state in migrations.info(config.database.url, config.database.connect_timeout,
                                           config.database.schema):
            print(f"{what}  {state}")
        return 0

    def warn(line):
        print(f"attune-sensor: {line}", file=sys.stderr)

    if args.migrate_command == "uninstall":
        migrations.uninstall(config.database.url, config.database.connect_timeout, config.database.schema,
                             yes=args.yes, drop_role=args.drop_role, warn=warn)
        return 0

    applied = migrations.run(config.database.url, config.database.connect_timeout, warn=warn,
                             configured_schema=config.database.schema, tune_heartbeats=args.tune_heartbeats)
    if not applied:
        print("database schema is up to date")
    return 0


def _attached_db(config):
    """(db, worker table): a bounded connection that finds the worker table (schema.attach).
    The caller closes db."""
    from .db import schema
    from .db import Database

    db = Database.from_config(config, application_name="attune-sensor cli")
    try:
        return db, schema.attach(db, config.database.schema)
    except BaseException:
        db.close()
        raise


def _fleet_query(config, **filters):
    from . import fleet

    db, table = _attached_db(config)
    try:
        return fleet.list_workers(db, config.sensor.stale_multiplier, table=table, **filters)
    finally:
        db.close()


def _age(seconds):
    if seconds is None:
        return "never"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _pending_count(db, table, config):
    """Sensors waiting for an eligible worker (placed on none, or on one that is gone); None
    where this database or role has no assignments."""
    if not table.assignments:
        return None
    from .placement.scheduler import Scheduler

    try:
        return Scheduler(db, table, config.sensor.stale_multiplier).pending_summary(groups=0)[0]
    except AttuneSensorError:
        return None


def cmd_workers(args):
    from . import fleet

    config = _load(args)
    db, table = _attached_db(config)
    try:
        workers = fleet.list_workers(db, config.sensor.stale_multiplier, table=table, runtime=args.runtime,
                                     stale_only=args.stale)
        pending = _pending_count(db, table, config)
    finally:
        db.close()
    stats = dict(fleet.summary(workers), pending=pending)
    if args.json:
        json.dump({"workers": workers, "summary": stats}, sys.stdout, indent=None if args.watch else 2, default=str)
        print(flush=True)
        if args.watch:
            _watch(args, config)
        return 0
    header = ("NAME", "HOST", "STATUS", "RUNTIMES", "SENSORS", "HEARTBEAT", "LABELS", "TAINTS")
    rows = [(w["name"], w["host"] or "",
             w["status"] + (" (stale)" if w["stale"] else "") + (" (cordoned)" if w["cordoned"] else "")
             + (" (platform)" if w["by"] == "platform" else ""),  # run by the platform's sensor service
             ",".join(w["runtimes"]), f"{'-' if w['sensors'] is None else w['sensors']}/{w['capacity']}",
             _age(w["heartbeat_age"]),
             ",".join(f"{k}={v}" for k, v in w["labels"].items()) or "-",
             ",".join(w["taints"]) or "-") for w in workers]
    _print_table(header, rows)
    lag = stats["max_heartbeat_lag"]
    print()
    print(f"active: {stats['active']} of {stats['total']}   stale: {stats['stale']}   "
          f"capacity: {stats['capacity']} sensors   max heartbeat lag: {'-' if lag is None else f'{lag:.1f}s'}")
    print("runtimes: " + (", ".join(f"{k} {v}" for k, v in stats["runtimes"].items()) or "-"))
    if pending is not None:
        print(f"pending: {pending} sensor(s) waiting for an eligible worker"
              + (" (attune-sensor assignments --pending lists them)" if pending else ""))
    if args.watch:
        _watch(args, config)
    return 0


def _watch(args, config):
    from . import fleet

    db, table = _attached_db(config)
    db.close()
    if table.is_platform:
        raise AttuneSensorError(
            "--watch needs attune-sensor's worker-event trigger, which it does not add to the Attune "
            "platform's schema; use 'attune-sensor workers' (or the platform's worker_history table)")

    def show(event):
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            extra = f" by {event['by']}" if event.get("by") else ""
            print(f"{event.get('at', '')}  {event.get('event')}  {event.get('name')} (id {event.get('id')}, "
                  f"host {event.get('host')}){extra}", flush=True)

    print("watching worker events (Ctrl-C to stop)", file=sys.stderr, flush=True)
    fleet.watch(config.database.url, config.database.connect_timeout, show)


def cmd_check(args):
    config = _load(args)
    name = config.sensor.worker_name
    found = _fleet_query(config, name=name)
    worker = found[0] if found else None
    if worker is None:
        print(f"CRITICAL: worker {name} is not registered")
        return CHECK_CRITICAL
    age = _age(worker["heartbeat_age"])
    if worker["status"] != "active":
        print(f"CRITICAL: worker {name} (id {worker['id']}) is {worker['status']}, last heartbeat {age}")
        return CHECK_CRITICAL
    if worker["stale"]:
        print(f"CRITICAL: worker {name} (id {worker['id']}) is stale, last heartbeat {age}")
        return CHECK_CRITICAL
    mine, pending_for_me = _my_placement(config, worker["id"])
    failed = [(r["sensor_ref"], " ".join(str(r["detail"] or "").split())[:200]) for r in mine if r["state"] == "failed"]
    if failed:
        shown = "; ".join(f"{ref}: {detail}" for ref, detail in failed[:3])
        print(f"CRITICAL: worker {name} (id {worker['id']}): {len(failed)} placed sensor(s) failed ({shown})")
        return CHECK_CRITICAL
    cordoned = " (cordoned: the platform schedules nothing new on it)" if worker["cordoned"] else ""
    sensors = "" if worker["sensors"] is None else f", {worker['sensors']} of {worker['capacity']} sensors placed"
    if pending_for_me:
        print(f"WARNING: worker {name} (id {worker['id']}) active, but sensors it is eligible for are pending "
              "(placement passes failing? see the journal); last heartbeat " + age)
        return CHECK_WARNING
    states = {}
    for row in mine:
        states[_state(row)] = states.get(_state(row), 0) + 1
    running = f" ({', '.join(f'{n} {state}' for state, n in sorted(states.items()))})" if states else ""
    print(f"OK: worker {name} (id {worker['id']}) active{cordoned}{sensors}{running}, last heartbeat {age}")
    return CHECK_OK


def _my_placement(config, worker_id):
    """(this worker's placements with their states as it last reported them, whether a pending
    sensor could be placed on it now) over one connection: ([], False) where this role may not
    read them, so that check still judges the worker."""
    try:
        scheduler, db = _scheduler(config)
    except AttuneSensorError:
        return [], False
    try:
        try:
            rows = scheduler.assignments(worker=config.sensor.worker_name)
        except AttuneSensorError:
            rows = []
        try:
            pending_for_me = scheduler.survey(worker_id)[1]
        except AttuneSensorError:
            pending_for_me = False
    finally:
        db.close()
    return rows, pending_for_me


def cmd_metrics(args):
    from . import fleet

    config = _load(args)
    db, table = _attached_db(config)
    try:
        stats = fleet.metrics(db, config.sensor.stale_multiplier, table)
    finally:
        db.close()
    lines = []

    def gauge(name, help_text, samples):
        lines.append(f"# HELP attune_sensor_{name} {help_text}")
        lines.append(f"# TYPE attune_sensor_{name} gauge")
        for labels, value in samples:
            # label values from other writers' rows may hold anything: escaped as the format wants
            label_text = ",".join(f'{k}="{_prometheus_escape(v)}"' for k, v in labels.items())
            lines.append(f"attune_sensor_{name}{{{label_text}}} {value}" if label_text else f"attune_sensor_{name} {value}")

    # only the roles this worker table can hold: the platform's enum has no hybrid
    gauge("workers_active", "Active workers by role.", [({"role": r}, n) for r, n in stats["active"].items()
                                                        if table.allows("worker_role", r)])
    gauge("workers_stale", "Active workers whose heartbeat is overdue.", [({}, stats["stale"])])
    gauge("workers_reaped", "Workers marked inactive by the stale reaper and not back since.",
          [({}, stats["reaped"])])
    gauge("runtime_workers", "Active workers offering each runtime.",
          [({"runtime": k}, v) for k, v in stats["runtimes"].items()])
    gauge("heartbeat_lag_seconds", "Seconds since the oldest active worker's heartbeat.",
          [({}, f"{stats['max_heartbeat_lag']:.3f}")])
    gauge("capacity_sensors", "Sum of max_concurrent_sensors over active workers.", [({}, int(stats["capacity"]))])
    if "pending" in stats:
        gauge("sensors_pending", "Sensors waiting for an eligible worker with room.", [({}, int(stats["pending"]))])
        gauge("sensors_stranded", "Sensors placed on a worker that is dead, gone or stopped, not yet moved.",
              [({}, int(stats["stranded"]))])
    gauge("gauges_age_seconds", "Seconds since the gauges above were computed (shared fleet-wide, at most "
          f"{fleet.GAUGES_PERIOD:g} s old).", [({}, f"{stats['age']:.3f}")])
    print("\n".join(lines))
    return 0


def _scheduler(config):
    from .placement.scheduler import Scheduler

    db, table = _attached_db(config)
    if not table.assignments:
        db.close()
        raise AttuneSensorError("this database lacks attune_sensor.assignment or attune_sensor.worker_load (or "
                                "this role may not use them): run 'attune-sensor migrate run' with this version")
    return Scheduler(db, table, config.sensor.stale_multiplier), db


def _platform_owned(scheduler, db, ref, doing):
    """A UsageError when `ref` is one of the platform's sensors: their placements follow the
    platform's rows (platform/sync.py), never a command (docs/scheduling.md, "The platform's
    sensors")."""
    from .platform import sensors

    if scheduler.table.platform_sensors and sensors.known(db, ref):
        return UsageError(f"{doing}: sensor {ref!r} is one of the platform's: its placement follows its sensor row "
                          "(enabled, rules, worker_selector, worker_tolerations, worker_affinity); change that "
                          "row, and 'attune-sensor sync' applies it")
    return None


def cmd_place(args):
    config = _load(args)  # the arguments were checked by _check_arguments
    scheduler, db = _scheduler(config)
    try:
        refused = _platform_owned(scheduler, db, args.sensor_ref, "place")
        if refused:
            raise refused
        print(scheduler.place(args.sensor_ref, args.runtime, args.selector, args.tolerate,
                              entrypoint=args.entrypoint, env=args.env))
    except ValueError as exc:
        raise UsageError(f"place: {exc}") from None
    finally:
        db.close()
    return 0


def cmd_rebalance(args):
    scheduler, db = _scheduler(_load(args))
    try:
        moves = scheduler.rebalance()
    finally:
        db.close()
    for ref, source, target in moves:
        print(f"moved {ref}: {source} -> {target}")
    print(f"{len(moves)} sensor(s) moved")
    return 0


def cmd_unplace(args):
    scheduler, db = _scheduler(_load(args))
    try:
        if scheduler.origin(args.sensor_ref) == "platform":
            raise _platform_owned(scheduler, db, args.sensor_ref, "unplace") or UsageError(
                f"unplace: sensor {args.sensor_ref!r} was placed from the platform's rows: "
                "'attune-sensor sync' removes it once the platform no longer runs it")
        if not scheduler.unplace(args.sensor_ref):
            print(f"attune-sensor: sensor {args.sensor_ref!r} is not placed", file=sys.stderr)
            return 1
    finally:
        db.close()
    return 0


def cmd_sync(args):
    from .placement.scheduler import PLACEMENT_LOCK_KEY
    from .platform import sync

    config = _load(args)
    scheduler, db = _scheduler(config)
    try:
        if not scheduler.table.platform_sensors:
            raise AttuneSensorError("sync: this database has no platform sensors to place (the Attune platform's "
                                    "sensor, trigger, rule, runtime and runtime_version tables), or this role may "
                                    "not read them: 'attune-sensor migrate run' grants attune_sensor_daemon that")
        try:
            result = sync.run(db, f"sync command ({config.sensor.worker_name})", PLACEMENT_LOCK_KEY, force=True)
        except (sync.TooManySensors, sync.Superseded) as exc:
            raise AttuneSensorError(f"sync: {exc}") from None
        released = scheduler.release_ineligible() if result.changes else []
        _, placed = scheduler.reconcile()
        pending, _ = scheduler.pending_summary()
    finally:
        db.close()
    for ref, change in result.changes:
        print(f"{change} {ref}")
    for ref, worker in released:
        print(f"released {ref} from {worker} (it may no longer run it)")
    for ref, worker in sorted(placed.items()):
        print(f"placed {ref} on {worker}")
    for ref, why in result.refused:
        print(f"not placed {ref}: {why}")
    for ref, why in result.defaulted:
        print(f"warning {ref}: {why}")
    for ref in result.manual:
        print(f"manual placement kept {ref}: the platform runs it too; 'unplace' it to place it by the platform's rules")
    print(f"{result.runnable} platform sensor(s) runnable: {result.count('added')} added, "
          f"{result.count('changed')} changed, {result.count('removed')} removed, {len(result.refused)} not "
          f"placeable, {len(result.manual)} held by manual placements; {len(placed)} placed, {pending} pending")
    return 0


def cmd_assignments(args):
    config = _load(args)
    scheduler, db = _scheduler(config)
    try:
        rows = scheduler.assignments(worker=config.sensor.worker_name if args.mine else args.worker,
                                     pending=args.pending)
    finally:
        db.close()
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        print()
        return 0
    _print_table(("SENSOR", "RUNTIME", "WORKER", "STATE", "PID"),
                 [(r["sensor_ref"], r["runtime"], r["worker"] or "(pending)", _state(r), str(r["pid"] or "-"))
                  for r in rows])
    return 0


def _state(row):
    """A placement's state for people: the process's, as its worker last reported it."""
    if not row["worker"]:
        return "pending"
    if not row["entrypoint"]:
        return "placed (no entrypoint)"
    return row["state"] or "starting"


def _print_table(header, rows):
    """Columns of text, each as wide as its widest cell, two spaces apart."""
    # cells may come from rows anyone wrote: no control character reaches the terminal
    rows = [tuple("".join(c if c.isprintable() else "?" for c in cell) for cell in row) for row in rows]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _prometheus_escape(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def cmd_config(args):
    import yaml

    try:
        config = _load(args)
    except DatabaseUrlMissing as exc:
        if args.is_configured:
            print(f"attune-sensor: not started: {exc}; then start the service again", file=sys.stderr)
            return 1
        raise
    except ConfigError:
        if args.is_configured:
            return 0  # configured, but wrongly: 'run' then fails with the precise message
        raise
    if not args.is_configured:
        for line in config.warnings:
            print(f"attune-sensor: warning: {_one_line(line)}", file=sys.stderr)
        sys.stdout.write(yaml.safe_dump(config_module.describe(config), sort_keys=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
