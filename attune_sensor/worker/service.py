"""SensorService: the daemon's loop, its timing, what it does on reload, and its shutdown order.
No SQL here.

One thread. Signals arrive as flags that cut a sleep short (signals.py), so every action
happens between two bounded database calls:

    register (retrying while the database is away) -> READY=1
    every heartbeat_interval: heartbeat (carrying the gated reaper) -> WATCHDOG=1
    every max(10 s, interval): read this worker's sensors -> the supervisor runs them
    between: the sensors' output, exits and restarts (runner/), and the fence: no heartbeat
        for too long stops every sensor before peers may call this worker dead
    SIGHUP: RELOADING=1 -> reload config -> READY=1
    SIGTERM/SIGINT: STOPPING=1 -> stop sensors -> deregister -> hand them over -> exit 0
"""

import os
import time
from dataclasses import replace

from .. import config as config_module
from .. import fleet, logs
from ..db import Backoff, Database, schema
from ..errors import ConfigError, DatabaseError, DatabaseUnavailable, SchemaMissing
from ..placement.scheduler import PLACEMENT_LOCK_KEY, Scheduler
from ..runner import fence, launch, leftovers, report
from ..runner.supervisor import SensorSpec, Supervisor
from . import assignments_file, runtimes
from .notify import WATCHDOG_MULTIPLE, Notifier, check_watchdog_fits, watchdog_for
from .registration import SensorWorkerRegistration, partial_heartbeat
from .signals import SignalFlags

log = logs.get("service")

# At stop the database gets one short try: systemd should not wait on an absent server,
# and the reaper marks the row if this fails (docs/design.md, "Shutdown").
STOP_CONNECT_TIMEOUT = 2.0
STOP_STATEMENT_TIMEOUT = 2.0
# A placement pass (failover, pending sensors) may take this share of an interval; what it
# could not reach continues at the next beat, so a mass failure is worked off in a few beats
# while heartbeats keep their rhythm. At stop it gets a fixed time, inside TimeoutStopSec.
RECONCILE_SHARE = 0.5
STOP_RECONCILE_BUDGET = 5.0
# A worker that comes back (a restart: it handed its sensors over when it stopped, and its
# registration took its own row again) is brought back to its share: each pass from then on makes
# at most this many rebalance moves (scheduler.rebalance: each evens the fleet out and restarts
# one sensor, as a planned move: it starts here once its previous worker said it stopped it), and
# the next beat goes on while a pass used them all. A new worker (a row of its own made now) moves
# nothing: adding hosts is evened out by `rebalance` (docs/scheduling.md, "Failover").
EVEN_OUT_MOVES_PER_PASS = 10
# How often a daemon reads the sensors placed on it: a statement of its own at this slower
# cadence, never one more on the heartbeat path (docs/scheduling.md, "The worker's side").
ASSIGNMENT_READ_PERIOD = 10.0
# What a running daemon logs and rides out; anything else is a bug and ends the process.
DATABASE_TROUBLE = (DatabaseUnavailable, DatabaseError, SchemaMissing)


class SensorService:
    """Runs one sensor worker: `start()` registers and blocks in the heartbeat loop until
    `stop()` is called (or SIGTERM/SIGINT arrives), then deregisters and returns."""

    def __init__(self, config, config_path=None, environ=None, notifier=None, db=None, clock=time.monotonic):
        self.environ = os.environ if environ is None else environ
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self._watchdog_usec = None  # what systemd's watchdog was last asked to be (WATCHDOG_USEC=)
        self.db = db or Database.from_config(config)
        self.clock = clock
        detected, source, interpreters = runtimes.resolve(config.sensor.runtimes, self.environ)
        self.runtime_source = source
        self.runtimes = detected
        self.interpreters = interpreters
        # Until the worker table is found, the spec's default; then schema.choose_interval().
        self.interval = config.sensor.heartbeat_interval or schema.DEFAULT_RECORDED_INTERVAL
        self.table = None
        self.scheduler = None  # placement (scheduler.py), once the worker table is found
        self.registration = SensorWorkerRegistration(self.db, config, detected, self.environ,
                                                     interpreters=interpreters)
        self.signals = SignalFlags()
        self._capabilities_pending = False
        self._database_down = False
        self._next_assignment_read = 0.0
        self._next_survey = 0.0  # the periodic placement survey (_maybe_survey)
        self._placement_unfinished = False  # the last pass ran out of time with sensors pending
        self._my_sensors = None  # {ref: row} last read; None before the first read
        self._api_token = ""
        self.supervisor = Supervisor(self._launch, config.sensor.max_concurrent_sensors,
                                     config.sensor.sensor_timeout, clock=clock,
                                     marks=(config.sensor.worker_name, self.registration.instance_id))
        self._last_ok = None  # clock() when the last heartbeat that succeeded was sent
        self._fenced = False  # sensors stopped for lack of heartbeats, until one succeeds
        self._reported = None  # the sensor states last written (runner/report.py)
        self._ready = []  # the sensors' pipes the last wait found readable
        self._sensors_from = None  # clock() before which no sensor starts (a live row taken over)
        self._evening_out = False  # a worker back from a restart still taking its share (_reconcile)
        self._sync_said = None  # the platform sensors last said to be refused or read by default (_sync)
        self._written = None  # what the assignments file last said, and the last error writing it
        self._write_error = None
        self._previous_reaped = False  # what earlier instances of this worker left running, killed
        # (running, monitored) as capabilities last say: 0 from the registration on, so that a
        # worker running nothing never rewrites its row for them (the platform's history)
        self._counts = (0, 0)

    # --- public -------------------------------------------------------------------------

    def start(self):
        sensor = self.config.sensor
        if sensor.heartbeat_interval is not None:
            check_watchdog_fits(sensor.heartbeat_interval, self.environ)
        self._api_token = self._read_token(self.config)
        _raise_open_files_limit()
        previous = self.signals.install()
        try:
            log.info("Registering sensor worker %s (host %s, runtimes %s from %s)",
                     sensor.worker_name, sensor.host, ",".join(self.registration.capabilities["runtimes"]),
                     self.runtime_source)
            for line in self.config.warnings:  # right after the start-up line (a readable secret)
                log.warning("%s", line)
            if not self._register_until_done():
                log.info("Stopped before the worker was registered")
                return
            self.notifier.ready(self._status_line())
            self._maybe_read_assignments(force=True)
            self._loop()
        finally:
            try:
                self._shutdown()
            finally:
                self.signals.restore(previous)

    def stop(self):
        self.signals.request_stop()

    def reload(self):
        self.signals.request_reload()

    # --- start-up -----------------------------------------------------------------------

    def _register_until_done(self):
        backoff = Backoff()
        while not self.signals.stop_requested:
            if self.signals.take_reload():
                self._apply_reload()
            try:
                if self.table is None:
                    self._find_worker_table()
                sent = self.clock()
                worker_id = self.registration.register()
                self._last_ok = sent
                if self.registration.previous_window:
                    # took the row over from a live instance on this machine: its sensors may run
                    # until it notices or its fence stops them; ours wait that long
                    self._sensors_from = sent + self.registration.previous_window
                    log.warning("worker %s was held by another live instance on this machine; it stops at its "
                                "next heartbeat, and this worker's sensors start in %.1fs, once it must have "
                                "stopped them", self.registration.worker_name, self.registration.previous_window)
            except DatabaseUnavailable as exc:
                delay = backoff.next_delay()
                bound = self.db.connect_timeout + self.db.statement_timeout
                log.warning("Database not reachable, sensor worker not registered yet; retrying in %.1fs: %s", delay, exc)
                # Ask systemd for more start time than the next attempt can take.
                self.notifier.extend_timeout(delay + bound + 5, f"Waiting for the database: {exc}")
                self.notifier.watchdog()
                self._wait_until(self.clock() + delay)
                continue
            log.info("Registered sensor worker %s as id %s (instance %s)",
                     self.registration.worker_name, worker_id, self.registration.instance_id)
            self._reconcile("this worker registered")  # new capacity: place what is pending
            return True
        return False

    def _find_worker_table(self):
        """Where the worker table is and what it is decides the interval and capabilities."""
        table = schema.attach(self.db, self.config.database.schema)
        schema.check_own_schema(table, schema.own_schema_version())
        schema.check_worker_type(table, self.registration.worker_type)
        self.table = table
        interval = self._interval_for(self.config)
        check_watchdog_fits(interval, self.environ)
        self.interval = interval
        self._set_capabilities(self.config, self.runtimes, interval, self.interpreters)
        self.registration.reap_multiplier = self._reap_multiplier()
        self.scheduler = Scheduler(self.db, table, self.config.sensor.stale_multiplier)
        log.info("Using the %s; interval %gs", table.describe(), interval)
        self._follow_watchdog()

    def _follow_watchdog(self):
        """systemd's watchdog follows the heartbeat interval (docs/design.md, "Watchdog"): sent
        once the interval is known and after each reload, when systemd armed one."""
        usec = watchdog_for(self.interval, self.environ)
        if usec is None:
            return
        self.notifier.watchdog_timeout(usec)
        if usec != self._watchdog_usec:
            self._watchdog_usec = usec
            log.info("systemd watchdog: %gs (%d x the %gs heartbeat interval, at least the unit's WatchdogSec)",
                     usec / 1_000_000, WATCHDOG_MULTIPLE, self.interval)

    def _set_capabilities(self, config, detected, interval, interpreters):
        """The registration's capabilities, with the sensor process counts as last reported."""
        self.registration.set_capabilities(config, detected, interval, interpreters)
        # the own schema this worker's code speaks: the platform's sensors are placed only on
        # workers that run them as placed (attune_sensor.version_holds; docs/design.md, "The
        # platform's sensors"), never on a daemon of an earlier version during an upgrade
        self.registration.add_capability(schema.CONTRACT_CAPABILITY, schema.own_schema_version())
        self._add_counts(self._counts)

    def _add_counts(self, counts):
        """(running, monitored) sensor processes into the capabilities the platform's UI shows."""
        self.registration.add_capability("sensor_processes_running", counts[0])
        self.registration.add_capability("sensor_processes_monitored", counts[1])

    def _interval_for(self, config):
        """The heartbeat interval `config` asks for, under the worker table's rules once known."""
        if self.table is None:
            return config.sensor.heartbeat_interval or schema.DEFAULT_RECORDED_INTERVAL
        return schema.choose_interval(config.sensor.heartbeat_interval, self.table, config.database.statement_timeout)

    def _reap_multiplier(self):
        """The reaper rides on every heartbeat (through the gate of the own schema, which the
        daemon requires), unless sensor.reaper is false (None)."""
        return self.config.sensor.stale_multiplier if self.config.sensor.reaper else None

    def _wait_until(self, deadline):
        """Sleeps until `deadline`, applying reloads on the way: signals never shorten a backoff,
        so a burst of SIGHUPs cannot turn into a burst of connection attempts."""
        while not self.signals.stop_requested:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            self._sleep(remaining)
            self._supervise()
            if self.signals.take_reload():
                self._apply_reload()

    # --- the loop -----------------------------------------------------------------------

    def _loop(self):
        next_beat = self.clock() + self.interval
        while not self.signals.stop_requested:
            self._sleep(max(0.0, next_beat - self.clock()))
            if self.signals.stop_requested:
                break
            self._supervise()
            if self.signals.take_reload():
                self._apply_reload()
            now = self.clock()
            if now < next_beat:
                if self._next_assignment_read == 0.0:
                    self._maybe_read_assignments()  # asked for now: a handover to confirm
                continue
            self._heartbeat()
            interval = self.interval
            # Keep the rhythm: the next beat is one interval after the scheduled one, unless
            # the loop fell a whole interval behind (a long outage), then start afresh.
            next_beat += interval
            if next_beat <= self.clock():
                next_beat = self.clock() + interval

    def _heartbeat(self):
        registration = self.registration
        self._supervise()  # the fence's deadline for this call, as of now
        reaped = ()
        try:
            sent = self.clock()
            try:
                beat = registration.heartbeat()
            except Exception as exc:
                # what the heartbeat's reaper marked committed before the failure: logged and
                # failed over all the same (docs/design.md, "Reaper")
                reaped = getattr(partial_heartbeat(exc), "reaped", ())
                if not isinstance(exc, DATABASE_TROUBLE):
                    self._log_reaped(reaped)  # the daemon stops here; peers' surveys re-place their sensors
                raise
            reaped = beat.reaped
            self._last_ok = sent
            if self._fenced:
                # Proven alive again: the sensors start once the read says they are still ours.
                self._fenced = False
                self._next_assignment_read = 0.0
                log.info("heartbeat succeeded again: sensors start again where they are still placed here")
            if self._database_down:
                # Said before the beat's own line: the beat is what proved it.
                self._database_down = False
                log.info("Database reachable again")
                self.notifier.status(self._status_line())
            if beat.updated:
                log.info("heartbeat: worker %s (id %s) active", registration.worker_name, registration.worker_id)
            else:
                log.warning("heartbeat: worker %s was missing from the database and was registered again as id %s",
                            registration.worker_name, registration.worker_id)
            if beat.outside_change:
                # cordons are the platform's: the spec's schema has none
                log.warning("worker %s: %s; it is active again since this daemon is alive (%s)",
                            registration.worker_name, beat.outside_change,
                            "to keep a live worker out of scheduling, cordon it"
                            if self.table is not None and self.table.is_platform
                            else "to take it out of service, stop its daemon")
            if self._capabilities_pending:
                registration.update_capabilities()
                self._capabilities_pending = False
        except DATABASE_TROUBLE as exc:
            self._database_down = True
            log.warning("heartbeat failed for worker %s, next try in %gs: %s",
                        registration.worker_name, self.interval, exc)
            self.notifier.status(f"Database unreachable, heartbeats failing: {exc}")
        # After every attempt that ended within its bound, database up or down (docs/design.md, "Watchdog").
        self.notifier.watchdog()
        ran = self._after_reaping(reaped)
        if not ran and self._placement_unfinished and not self._database_down:
            ran = self._reconcile("the previous pass, which ran out of time")
        if not ran:
            self._maybe_survey()  # a beat runs one placement pass at most
        self._maybe_read_assignments()

    def _maybe_survey(self):
        """Every max(10 s, interval), one statement (never on the heartbeat path): a placement
        pass when this worker holds sensors it may no longer run, when a pending sensor could
        go to it (capacity or eligibility appeared: an unplace, a lifted cordon), or when this
        daemon refreshed the fleet's gauges and they show sensors stranded on workers that are
        not live (a failover pass that failed, a worker row deleted by hand). The gauges are
        refreshed by one caller per period fleet-wide, so that pass runs once per period."""
        if (self.scheduler is None or self._database_down or self.registration.worker_id is None
                or self.clock() < self._next_survey):
            return
        self._next_survey = self.clock() + max(ASSIGNMENT_READ_PERIOD, self.interval)
        synced = self._sync()
        try:
            keeps, can_take, gauges_due = self.scheduler.survey(self.registration.worker_id)
            stranded = 0
            if gauges_due:
                gauges = fleet.refresh_gauges(self.db, self.config.sensor.stale_multiplier)
                stranded = int((gauges or {}).get("stranded") or 0)
        except DATABASE_TROUBLE as exc:
            log.warning("could not survey sensor placement: %s", exc)
            return
        reasons = [text for flag, text in ((synced, "the platform's sensors changed"),
                                           (keeps, "this worker holds sensors it may no longer run"),
                                           (can_take, "pending sensors this worker may take"),
                                           (stranded, f"{stranded} sensor(s) on workers that are not live")) if flag]
        if reasons:
            self._reconcile(" and ".join(reasons))

    def _sync(self):
        """On the platform's database, the sync pass when the fleet-wide gate lets this daemon
        run it (platform/sync.py): the platform's runnable sensors become assignments. Returns
        True when it changed any; what the pass changed is logged, and the sensors it cannot
        place or whose placement values read as their default once, when that list changes."""
        if not self.table.platform_sensors:
            return False
        from ..platform import sync  # here: only the platform's database needs it

        try:
            result = sync.run(self.db, self.registration.worker_name, PLACEMENT_LOCK_KEY)
            if result.changes:
                # a changed sensor may no longer fit where it is, on any worker: released now
                self.scheduler.release_ineligible()
        except (sync.TooManySensors, sync.Superseded) as exc:
            log.warning("platform sensors not synced: %s", exc)
            return False
        except DATABASE_TROUBLE as exc:
            log.warning("could not sync the platform's sensors: %s", exc)
            return False
        if not result.ran:
            return False
        if result.changes:
            shown = ", ".join(f"{ref} {change}" for ref, change in result.changes[:20])
            more = f" and {len(result.changes) - 20} more" if len(result.changes) > 20 else ""
            log.info("platform sensors synced: %d runnable; %d added, %d changed, %d removed (%s%s)",
                     result.runnable, result.count("added"), result.count("changed"), result.count("removed"),
                     shown, more)
        said = (tuple(result.refused), tuple(result.defaulted), tuple(result.manual))
        if said != self._sync_said:
            for ref, why in result.refused:
                log.warning("platform sensor %s is not placed: %s", logs.without_controls(ref), why)
            for ref, why in result.defaulted:
                log.warning("platform sensor %s: %s", logs.without_controls(ref), why)
            for ref in result.manual:
                log.warning("platform sensor %s is held by a manual placement (kept as it is; 'attune-sensor unplace' "
                            "it to place it by the platform's rules)", logs.without_controls(ref))
            self._sync_said = said
        return bool(result.changes)

    # --- the sensors: supervision and the fence ------------------------------------------

    def _supervise(self):
        """Between two database calls: the children's output and exits, and the fence. Bounds
        the database calls that follow by the fence's next action."""
        ready, self._ready = self._ready, []
        self.supervisor.poll(ready)
        if self._sensors_from is not None and self.clock() >= self._sensors_from:
            self._sensors_from = None
            self._next_assignment_read = 0.0  # the wait for the instance taken over is over
        if self.supervisor.take_released():
            self._next_assignment_read = 0.0  # say so now: a handover or a new placement waits on it
        times = self._fence_times()
        if times is None:
            self.db.deadline = None
            return
        term_at, kill_at = times
        if not self._fenced and self.clock() >= term_at:
            self._fenced = True
            log.warning("no heartbeat has succeeded for %.1fs: stopping %d sensor(s) before peers may call this "
                        "worker dead and run them elsewhere; they start again after a heartbeat succeeds",
                        self.clock() - self._last_ok, len(self.supervisor.children))
            self.supervisor.stop_all(kill_by=kill_at)
        # a call that hangs must not hold the loop past the SIGTERM (or, fenced, the SIGKILL) due
        due = kill_at if self._fenced else term_at
        self.db.deadline = time.monotonic() + max(0.0, due - self.clock())

    def _fence_times(self):
        """(term_at, kill_at) of the fence (runner/fence.py) while sensors run, else None."""
        if self._last_ok is None or not self.supervisor.children:
            return None
        sensor = self.config.sensor
        return fence.deadlines(self._last_ok, self._fence_setting("heartbeat_interval", self.interval),
                               self._fence_setting("stale_multiplier",
                                                   min(sensor.stale_multiplier, schema.MAX_RECORDED_MULTIPLIER)),
                               sensor.sensor_timeout)

    def _fence_setting(self, key, configured):
        """What peers judge this worker by: the value stored in its row, or the configured one
        if a reload lowered it and the row does not say so yet; the smaller of the two."""
        stored = (self.registration.stored_capabilities() or {}).get(key)
        if isinstance(stored, (int, float)) and not isinstance(stored, bool) and stored > 0:
            return min(stored, configured)
        return configured

    def _launch(self, spec):
        """Supervisor's launcher: (argv, env, cwd) for a placed sensor (runner/launch.py)."""
        script = launch.resolve_entrypoint(spec.entrypoint, self.config.packs_base_dir)
        argv = launch.command(spec.runtime, script, self.interpreters, self.config.sensor.runtimes_exec,
                              self.environ)
        contract = launch.contract_from(self.config, self._api_token, self.environ)
        env = launch.environment(contract, spec.ref, spec.sensor_id, spec.triggers, spec.env)
        env.update(leftovers.marks(*self.supervisor.marks))
        return argv, env, os.path.dirname(script)

    def _read_token(self, config):
        try:
            return launch.api_token(config.api.token_file, self.environ)
        except launch.LaunchRefused as exc:
            raise ConfigError(str(exc)) from None

    def _after_reaping(self, reaped):
        """Logs the workers a heartbeat reaped and re-places their sensors. Returns True when a
        placement pass ran."""
        self._log_reaped(reaped)
        names = [name for _, name, _ in reaped]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""  # one line, even after a mass failure
        return bool(reaped) and self._reconcile("reaping " + ", ".join(names[:5]) + more)

    @staticmethod
    def _log_reaped(reaped):
        for worker_id, name, host in reaped:
            log.warning("Marked stale worker %s (id %s, host %s) inactive", name, worker_id, host)

    def _maybe_read_assignments(self, force=False):
        """This worker's sensors, at most every max(10 s, interval) and never on the heartbeat
        path: logs `assigned sensor REF` / `released sensor REF`, hands the supervisor what it
        runs, reports the sensors' states, and keeps the assignments file (config
        sensor.assignments_file) for a local runtime."""
        if (self.scheduler is None or self._database_down or self.signals.stop_requested
                or self.registration.worker_id is None
                or (not force and self.clock() < self._next_assignment_read)):
            return
        self._next_assignment_read = self.clock() + max(ASSIGNMENT_READ_PERIOD, self.interval)
        worker_id = self.registration.worker_id
        try:
            rows, handed_over = self.scheduler.mine(worker_id, self.supervisor.held())
        except DATABASE_TROUBLE as exc:
            log.warning("could not read this worker's sensor assignments: %s", exc)
            return
        current = {row["sensor_ref"]: row for row in rows}
        previous = self._my_sensors or {}
        for ref in sorted(set(current) - set(previous)):
            log.info("assigned sensor %s (runtime %s)", ref, current[ref]["runtime"])
        for ref in sorted(set(previous) - set(current)):
            log.info("released sensor %s", ref)
        if handed_over:
            log.info("handed over %d sensor(s) moved to other workers: stopped here", handed_over)
        self._my_sensors = current
        if not self._fenced:  # after a fence only a heartbeat that succeeded lets them start
            specs = {ref: self._spec(row) for ref, row in current.items() if row["entrypoint"]}
            if self._sensors_from is not None and self.clock() < self._sensors_from:
                specs = {ref: replace(spec, startable=False,
                                      waiting_for="waiting for the instance this worker took over to stop it")
                         for ref, spec in specs.items()}
            elif specs and not self._previous_reaped:
                leftovers.reap_previous(*self.supervisor.marks)
                self._previous_reaped = True
            self.supervisor.set_desired(specs)
        self._report(worker_id, current)

    def _spec(self, row):
        waiting = f"waiting for {row['previous_worker'] or 'the previous worker'} to stop it (planned move)"
        return SensorSpec(ref=row["sensor_ref"], runtime=row["runtime"], entrypoint=row["entrypoint"],
                          sensor_id=row["sensor_id"], triggers=row["triggers"],
                          env=dict(row["env"]),  # an object: the column's CHECK, and MINE_SQL's bound
                          startable=bool(row["startable"]), waiting_for=waiting)

    def _report(self, worker_id, current):
        """The sensors' states where operators look: attune_sensor.sensor_run, capabilities'
        sensor_processes_running/monitored, the assignments file. Each only when changed."""
        states = self.supervisor.states()
        shown = {ref: {k: v for k, v in state.items() if k != "restart_in"} for ref, state in states.items()}
        try:
            if shown != self._reported:
                report.report(self.db, worker_id, states, self.registration.worker_name,
                              platform=self.table.sensor_processes)
                self._reported = shown
            counts = self.supervisor.counts()
            if counts != self._counts:
                self._add_counts(counts)
                self.registration.update_capabilities()
                self._counts = counts
        except DATABASE_TROUBLE as exc:
            log.warning("could not report this worker's sensor states: %s", exc)
        self._write_assignments(current, states)

    def _write_assignments(self, current, states):
        sensor = self.config.sensor
        path = assignments_file.path_for(sensor.assignments_file, sensor.worker_name, self.environ)
        if path is None:
            return
        document = (sorted(current), {ref: (s["status"], s["pid"]) for ref, s in states.items()})
        if document == self._written:
            return
        try:
            assignments_file.write(path, self.registration.worker_name, self.registration.worker_id, current, states)
            self._written = document
        except OSError as exc:
            self._written = None  # written again at the next read
            if exc.strerror != self._write_error:  # said once, not at every read
                log.warning("could not write the assignments file %s: %s", path, exc.strerror)
            self._write_error = exc.strerror
        else:
            self._write_error = None

    def _reconcile(self, why, budget=None, even_out=True):
        """Failover and pending sensors (scheduler.py), after the events that change capacity.
        Bounded in time per pass so the loop keeps its rhythm; what is left goes on at the next
        beat. From the registration of a worker that comes back (its row older than this
        registration), and while `even_out`, each pass also makes up to EVEN_OUT_MOVES_PER_PASS
        rebalance moves until the fleet is even. Returns True when a pass ran."""
        if self.scheduler is None:
            return False
        evening = even_out and self._evening_out
        moves = []
        try:
            if even_out and why == "this worker registered" and "created" in self.table.columns:
                # registered a moment ago, no heartbeat since: an older `created` is a row taken again
                evening = bool(self.db.execute("SELECT created < last_heartbeat FROM worker WHERE id = %s",
                                               (self.registration.worker_id,))[0][0])
            released, placed = self.scheduler.reconcile(
                budget=self.interval * RECONCILE_SHARE if budget is None else budget,
                worker_id=self.registration.worker_id)
            unfinished = self.scheduler.unfinished
            if evening and not unfinished:
                moves = self.scheduler.rebalance(limit=EVEN_OUT_MOVES_PER_PASS)
            # how many stay pending and why: only after a pass that changed something
            waiting = self.scheduler.pending_summary() if released or placed else (0, [])
        except DATABASE_TROUBLE as exc:
            log.warning("sensor placement after %s skipped (the next survey tries again): %s", why, exc)
            return False
        # a pass that used all its moves goes on at the next beat, until a pass moves fewer
        self._evening_out = evening and (unfinished or len(moves) >= EVEN_OUT_MOVES_PER_PASS)
        self._placement_unfinished = unfinished or self._evening_out
        if moves:
            log.info("Sensors moved to even out the fleet after %s: %d moved (%s)%s", why, len(moves),
                     ", ".join(f"{ref} from {source} to {target}" for ref, source, target in moves[:20]),
                     "; more at the next beat" if self._evening_out else "")
        if released or placed:
            shown = ", ".join(f"{ref} on {worker}" for ref, worker in sorted(placed.items())[:20])
            count, kinds = waiting
            stay = (f"; {count} stay pending ({'; '.join(f'{n}: {why_not}' for n, why_not in kinds)})"
                    if count else "; none pending")
            log.info("Sensors re-placed after %s: %d released, %d placed%s%s%s", why, len(released), len(placed),
                     f" ({shown})" if shown else "", stay,
                     "; more at the next beat" if self.scheduler.unfinished else "")
        self._next_assignment_read = 0.0  # show this worker's side of it at the next beat
        return True

    # --- reload -------------------------------------------------------------------------

    def _apply_reload(self):
        # Before registration (still waiting for the database) there is no READY=1 to renew:
        # systemd is told nothing, the new configuration is simply used by the next attempt.
        registered = self.registration.worker_id is not None
        if registered:
            self.notifier.reloading()
        try:
            self._reload_configuration()
        finally:
            if self.table is not None:
                self._follow_watchdog()
            if registered:
                self.notifier.ready(self._status_line())
        # `systemctl reload` is also how an operator asks for this worker's sensors now,
        # rather than at the next read (docs/scheduling.md, "The worker's side")
        self._maybe_read_assignments(force=True)

    def _reload_configuration(self):
        try:
            new = config_module.load(self.config_path, self.environ)
            detected, source, interpreters = runtimes.resolve(new.sensor.runtimes, self.environ)
            # database settings wait for a restart: the running statement bound still applies
            interval = self._interval_for(replace(new, database=self.config.database))
            check_watchdog_fits(interval, self.environ)
            token = self._read_token(new)
        except (ConfigError, ValueError) as exc:
            log.error("Reload failed, keeping the running configuration: %s", exc)
            return
        previous = self.config
        self.config, waiting = config_module.for_reload(self.config, new)
        for setting in waiting:
            log.warning("Reload: %s changed; the change takes effect at the next restart", setting)
        logs.set_level(new.log.level)
        self.interval = interval
        self.runtimes, self.interpreters = detected, interpreters
        self.registration.reap_multiplier = self._reap_multiplier()
        if self.scheduler is not None:
            self.scheduler.multiplier = self.config.sensor.stale_multiplier
        if (new.packs_base_dir, new.sensor.runtimes_exec) != (previous.packs_base_dir, previous.sensor.runtimes_exec):
            log.info("Reload: packs_base_dir or sensor.runtimes_exec changed; running sensors restart under it")
            self.supervisor.restart_all()
        self.supervisor.max_running = self.config.sensor.max_concurrent_sensors
        self.supervisor.sensor_timeout = self.config.sensor.sensor_timeout
        self._api_token = token  # a running sensor keeps its environment until it restarts
        self._set_capabilities(self.config, detected, interval, interpreters)
        self.runtime_source = source
        if self.registration.worker_id is None:
            log.info("Reloaded configuration: runtimes %s from %s, used at registration", ",".join(detected), source)
            return
        if self._database_down:
            # no connection attempt of its own: a burst of reloads during an outage must not
            # become a burst of connections; the next heartbeat that succeeds stores them
            self._capabilities_pending = True
            log.warning("Reloaded configuration; capabilities will be stored once the database answers")
            return
        try:
            self.registration.update_capabilities()
            self._capabilities_pending = False
            log.info("Reloaded configuration: runtimes %s from %s, heartbeat every %gs",
                     ",".join(detected), source, interval)
        except DATABASE_TROUBLE as exc:
            self._capabilities_pending = True
            log.warning("Reloaded configuration; capabilities will be stored once the database answers: %s", exc)
            return
        # capacity, labels or runtimes may have changed: the survey at the next beat (rather than
        # now, so the supervisor applies a lowered max_concurrent_sensors first) sends what this
        # worker may no longer run elsewhere, and brings pending sensors it may take now
        self._next_survey = 0.0

    # --- shutdown -----------------------------------------------------------------------

    def _stop_sensors(self):
        """Every sensor stopped (SIGTERM, SIGKILL after sensor_timeout) before the row says this
        worker is gone: then no peer can start one while it still runs here."""
        if not self.supervisor.children:
            return
        timeout = self.config.sensor.sensor_timeout
        # the unit's TimeoutStopSec covers the default; a longer sensor_timeout asks for more
        self.notifier.extend_timeout(timeout + STOP_CONNECT_TIMEOUT + STOP_STATEMENT_TIMEOUT * 3
                                     + STOP_RECONCILE_BUDGET + 5, "Stopping sensors")
        log.info("Stopping %d sensor(s)", len(self.supervisor.children))
        self.supervisor.stop_all()
        self.supervisor.wait_stopped(self.clock() + timeout + 2.0,
                                     lambda seconds, fds: self.signals.wait(seconds, fds, flags_end_it=False))

    def _shutdown(self):
        self.notifier.stopping()
        self._stop_sensors()
        self.db.deadline = None  # no sensor runs any more: the stop's own bounds apply
        registration = self.registration
        if registration.worker_id is not None:
            self.db.connect_timeout = min(self.db.connect_timeout, STOP_CONNECT_TIMEOUT)
            self.db.statement_timeout = min(self.db.statement_timeout, STOP_STATEMENT_TIMEOUT)
            try:
                if registration.deregister():
                    log.info("Deregistered sensor worker %s (id %s): status inactive",
                             registration.worker_name, registration.worker_id)
                    if self.scheduler is not None:
                        # stopped, so nobody need wait for this worker; they move to the living
                        # now, not when a reaper would notice
                        self.scheduler.hand_over(registration.worker_id)
                        report.clear(self.db, registration.worker_id, platform=self.table.sensor_processes)
                        self._reconcile("this worker stopped", budget=STOP_RECONCILE_BUDGET, even_out=False)
                else:
                    log.warning("Did not deregister worker %s: the row is no longer this instance's",
                                registration.worker_name)
            except DATABASE_TROUBLE as exc:
                log.warning("Could not deregister worker %s (%s); peers will mark it inactive once it is stale",
                            registration.worker_name, exc)
        self.db.close()

    # --- status and sleeping -------------------------------------------------------------

    def _status_line(self):
        sensor = self.config.sensor
        return (f"Worker {sensor.worker_name} (id {self.registration.worker_id}) active, "
                f"heartbeat every {self.interval:g}s")

    def _sleep(self, seconds):
        """Until `seconds` pass, a signal comes, a sensor writes or exits, or the supervisor has
        a restart or a SIGKILL due."""
        due = self.supervisor.next_due()
        if self._sensors_from is not None:
            due = min(due, self._sensors_from)
        times = self._fence_times()
        if times is not None and not self._fenced:
            due = min(due, times[0])  # the fence's SIGTERM comes on time, whatever else the loop waits for
        due -= self.clock()
        self._ready = self.signals.wait(min(seconds, max(0.0, due)), self.supervisor.fds())


# Two pipes per sensor: systemd's default soft limit of 1,024 descriptors would stop a worker at
# about 500 sensors; the hard limit (524,288 by default) is what the kernel allows us.
OPEN_FILES_WANTED = 65536


def _raise_open_files_limit():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
