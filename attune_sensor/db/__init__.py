"""Connecting to PostgreSQL with a hard bound on every call.

The daemon's connection runs in psycopg2's asynchronous mode and waits with select() against a
deadline. A server-side statement_timeout cannot bound a connection whose packets go nowhere
(a hung proxy, a half-open TCP session), and the watchdog contract (docs/design.md, "Watchdog") needs
every heartbeat attempt to end in time whatever the network does. When the deadline passes the
connection is dropped and the next call connects again.
"""

import json
import os
import select
import time

import psycopg2
import psycopg2.extensions
from psycopg2 import errorcodes

from ..config.dsn import scrub
from ..errors import DatabaseError, DatabasePermissionDenied, DatabaseUnavailable, SchemaMissing

APPLICATION_NAME = "attune-sensor"

# Dead peers are noticed by the kernel within about 25 s even between our calls.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

def _bounded_json(value, cursor):
    """json and jsonb values as Python objects, or a DataError (a DatabaseError for the caller:
    one line, the loop goes on) for a value nested deeper than Python's parser recurses. Any
    program may write a row; a row of `[[[[...` must not end the daemon."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except RecursionError:
        raise psycopg2.DataError("a JSON value read from the database is nested too deeply to read") from None


for _oid, _name in ((114, "JSON"), (3802, "JSONB")):
    psycopg2.extensions.register_type(psycopg2.extensions.new_type((_oid,), _name, _bounded_json))


def fraction():
    """A uniform number in [0, 1) for jitter, from os.urandom: importing `random` (with bisect,
    hashlib's sha512) is a visible share of the daemon's start-up (docs/performance.md, section 1)."""
    return int.from_bytes(os.urandom(7), "big") / (1 << 56)


class Backoff:
    """Capped exponential backoff with jitter, for retries at start-up."""

    def __init__(self, first=1.0, cap=30.0, rng=fraction):
        self.first, self.cap, self.rng = first, cap, rng
        self.attempt = 0

    def next_delay(self):
        delay = min(self.cap, self.first * (2 ** self.attempt))
        self.attempt += 1
        return delay * (0.8 + 0.4 * self.rng())


class Database:
    """One bounded connection. `execute` returns all rows; errors become DatabaseUnavailable
    (connection trouble, timeouts, read-only server), SchemaMissing, or DatabaseError."""

    def __init__(self, url, connect_timeout=5.0, statement_timeout=5.0, application_name=APPLICATION_NAME):
        self.url = url
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.application_name = application_name
        # Set by schema.attach() when the worker table is not on the connection's search_path.
        self.search_path = None
        self._conn = None
        self._abandoned = None  # (backend pid, statement text) of a call we gave up waiting for
        # A monotonic time no call may outlast, whatever its own timeout: while sensors run, the
        # fence's next action (runner/fence.py), so that a hung call never delays stopping them.
        self.deadline = None

    @classmethod
    def from_config(cls, config, application_name=APPLICATION_NAME):
        return cls(config.database.url, config.database.connect_timeout,
                   config.database.statement_timeout, application_name)

    @property
    def connected(self):
        return self._conn is not None and not self._conn.closed

    def connect(self):
        self.close()
        deadline = self._bounded(time.monotonic() + self.connect_timeout)
        try:
            conn = psycopg2.connect(self.url, async_=True, application_name=self.application_name, **KEEPALIVES)
            self._conn = conn
            _wait(conn, deadline)
        except Exception as exc:
            self.close()
            raise self._unavailable("cannot connect to the database", exc) from None
        if self._abandoned:
            self._cancel_abandoned(deadline)

    def _cancel_abandoned(self, deadline):
        """A statement we stopped waiting for may still run (or wait on a lock) on the server,
        holding a backend. Cancel it from the new connection, once: only if that backend still
        runs exactly what we sent (behind PgBouncer the pid is not a server's and nothing
        matches). Best effort: a failure here is the next call's problem."""
        pid, sent = self._abandoned
        self._abandoned = None
        try:
            cursor = self._conn.cursor()
            cursor.execute(CANCEL_ABANDONED_SQL, (pid, sent))
            _wait(self._conn, self._bounded(max(deadline, time.monotonic() + self.statement_timeout)))
            cursor.close()
        except Exception:
            self.close()
            raise DatabaseUnavailable("database call failed: no answer within the time limit") from None

    def execute(self, sql, params=None, plain=False, read_committed=False):
        """Runs one statement. Unless `plain`, a search_path set by schema.attach() goes with it
        in the same implicit transaction (a multi-statement query is one transaction), so no
        session state is needed and PgBouncer's transaction pooling is fine. With
        `read_committed`, that transaction runs at READ COMMITTED whatever the database's or
        role's default: placement reads after taking its locks (placement/scheduler.py)."""
        if not self.connected:
            self.connect()
        deadline = self._bounded(time.monotonic() + self.statement_timeout)
        try:
            cursor = self._conn.cursor()
            if self.search_path and not plain:
                sql = (cursor.mogrify("SELECT set_config('search_path', %s, true);", (self.search_path,))
                       + cursor.mogrify(sql, params))
                params = None
            sent = cursor.mogrify(sql, params) if params is not None else sql
            if read_committed:  # first in the transaction, as SET TRANSACTION must be
                sent = READ_COMMITTED + (sent if isinstance(sent, bytes) else sent.encode("utf-8"))
            cursor.execute(sent)
            _wait(self._conn, deadline)
            rows = cursor.fetchall() if cursor.description else []
            cursor.close()
            return rows
        except (psycopg2.OperationalError, psycopg2.InterfaceError, _Timeout, OSError) as exc:
            if isinstance(exc, _Timeout):
                text = sent.decode("utf-8", "replace") if isinstance(sent, bytes) else sent
                self._abandoned = (self._conn.info.backend_pid, text)
            self.close()
            raise self._unavailable("database call failed", exc) from None
        except psycopg2.Error as exc:
            # the primary message only: DETAIL and CONTEXT may carry a failing row's values or a
            # statement's text (rule parameters, capabilities), which no log line should show
            primary = exc.diag.message_primary if exc.diag is not None else None
            detail = scrub(primary or exc.pgerror or exc, self.url)
            detail = detail if len(detail) <= 500 else detail[:497] + "..."
            if exc.pgcode in (errorcodes.UNDEFINED_TABLE, errorcodes.UNDEFINED_OBJECT,
                              errorcodes.UNDEFINED_COLUMN, errorcodes.UNDEFINED_FUNCTION):
                raise SchemaMissing(
                    "the database lacks a table, column or function attune-sensor needs (" + detail + "); run "
                    "'attune-sensor migrate run'"
                ) from None
            if exc.pgcode and (exc.pgcode.startswith(("08", "57", "53"))
                               or exc.pgcode == errorcodes.READ_ONLY_SQL_TRANSACTION):
                # Connection exceptions, shutdown, insufficient resources, or a server that
                # turned read-only (a demoted primary): reconnecting, with libpq's multi-host
                # target_session_attrs=read-write, finds the writable server.
                self.close()
                raise self._unavailable("database call failed", exc) from None
            if exc.pgcode == errorcodes.INSUFFICIENT_PRIVILEGE:
                raise DatabasePermissionDenied(
                    detail + "; 'attune-sensor migrate run' (as the schema owner) grants the group role "
                    "attune_sensor_daemon what the daemon needs on this database, and the login role must be "
                    "in it (GRANT attune_sensor_daemon TO <role>)") from None
            raise DatabaseError("database refused the statement: " + detail) from None

    def _bounded(self, deadline):
        return deadline if self.deadline is None else min(deadline, self.deadline)

    def close(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _unavailable(self, what, exc):
        # a server's error (a serialization failure, a shutdown): its primary message only, as
        # for every other error (its CONTEXT may quote a statement or a row)
        primary = exc.diag.message_primary if isinstance(exc, psycopg2.Error) and exc.diag is not None else None
        reason = "no answer within the time limit" if isinstance(exc, _Timeout) else scrub(primary or exc, self.url)
        return DatabaseUnavailable(f"{what}: {reason or type(exc).__name__}")


READ_COMMITTED = b"SET TRANSACTION ISOLATION LEVEL READ COMMITTED;"

# pg_stat_activity keeps the first track_activity_query_size bytes of a statement: what we sent
# starts with what it shows. Same login role: no extra privilege needed to see or cancel it.
CANCEL_ABANDONED_SQL = """
SELECT pg_cancel_backend(pid) FROM pg_stat_activity
 WHERE pid = %s AND pid <> pg_backend_pid() AND state = 'active'
   AND length(query) > 16 AND starts_with(%s, query)
"""


class _Timeout(Exception):
    pass


def _wait(conn, deadline):
    """Drives an async psycopg2 connection until the current operation finishes or the deadline."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout()
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], remaining)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], remaining)
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


def connect_blocking(url, connect_timeout=5.0, application_name=APPLICATION_NAME + " migrate"):
    """An ordinary (transactional) connection, for migrations, which need BEGIN/COMMIT."""
    try:
        return psycopg2.connect(url, connect_timeout=max(1, int(round(connect_timeout))),
                                application_name=application_name, **KEEPALIVES)
    except psycopg2.Error as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {scrub(exc, url)}") from None


def json_param(value):
    # A JSON text parameter; PostgreSQL casts it to jsonb on assignment. (psycopg2.extras.Json
    # would do the same, but importing extras costs a noticeable share of start-up time.)
    return json.dumps(value)
