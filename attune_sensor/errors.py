"""Exceptions that cross module boundaries, and the exit code each one maps to (cli.py)."""

# sysexits.h values: systemd's RestartPreventExitStatus=78 relies on EX_CONFIG.
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_CONFIG = 78


class AttuneSensorError(Exception):
    """Base class: `str(err)` is a one-line message fit for an operator."""

    exit_code = EX_FAILURE


class ConfigError(AttuneSensorError):
    """A configuration value (file, environment, CLI) is wrong. The message names it."""

    exit_code = EX_CONFIG


class UsageError(AttuneSensorError):
    """A command-line argument is wrong (as argparse's own errors): exit 2."""

    exit_code = EX_USAGE


class DatabaseUrlMissing(ConfigError):
    """No database URL anywhere: the state of a fresh package install."""


class DatabaseUnavailable(AttuneSensorError):
    """The database could not be reached or did not answer within its bound."""

    exit_code = EX_UNAVAILABLE


class DatabaseError(AttuneSensorError):
    """The database refused a statement for a reason other than reachability."""


class DatabasePermissionDenied(DatabaseError):
    """The login role lacks a privilege: a deployment mistake restarting cannot fix."""

    exit_code = EX_CONFIG


class SchemaMissing(AttuneSensorError):
    """The database lacks the worker schema: `attune-sensor migrate run` has not been run."""

    exit_code = EX_CONFIG


class WorkerNameConflict(AttuneSensorError):
    """Another live host owns this worker name. Restarting cannot fix it, hence EX_CONFIG."""

    exit_code = EX_CONFIG

    def __init__(self, name, owner_host, message=None):
        self.name = name
        self.owner_host = owner_host
        super().__init__(message or (
            f"worker name {name!r} is in use by a live worker on host {owner_host!r}; "
            "set sensor.worker_name to a unique name on this host"
        ))


class WorkerTakenOver(WorkerNameConflict):
    """Our row was taken over by another process while we ran (fencing)."""

    def __init__(self, name, owner_host):
        super().__init__(name, owner_host, (
            f"worker {name!r} was taken over by another process on host {owner_host!r}; "
            "this instance stops so the two do not both claim the name"
        ))


class WorkerNameHeldByOtherRole(WorkerNameConflict):
    """The name belongs to a worker of another role (an action worker): never ours to take."""

    def __init__(self, name, role, owner_host):
        super().__init__(name, owner_host, (
            f"worker name {name!r} belongs to a worker of role {role!r} on host {owner_host!r}; "
            "attune-sensor only registers sensor rows and never changes a row's role: "
            "set sensor.worker_name to another name"
        ))


class WorkerNameHeldByPlatform(WorkerNameConflict):
    """The name belongs to a live sensor row of the Attune platform's own sensor service (a
    sensor row attune-sensor did not register): the platform's to run, never ours to share."""

    def __init__(self, name, owner_host):
        super().__init__(name, owner_host, (
            f"worker name {name!r} belongs to the Attune platform's own sensor service, live on host "
            f"{owner_host!r} (a sensor row attune-sensor did not register); attune-sensor leaves it to the "
            "platform: set sensor.worker_name to another name"
        ))


class ForeignWriter(WorkerNameConflict):
    """Another program rewrote our row while we ran: two writers must not share one row."""

    def __init__(self, name, worker_id, fields, owner_host):
        self.fields = tuple(fields)
        super().__init__(name, owner_host, (
            f"worker {name!r} (id {worker_id}) was rewritten by another program ({', '.join(fields)} "
            f"changed; the row now says host {owner_host!r}); this daemon stops heartbeating it so the two "
            "do not share one row: stop the other writer or give this host its own sensor.worker_name"
        ))


class MigrationError(AttuneSensorError):
    """A migration could not be applied or an applied migration changed on disk."""
