"""Helpers the test modules share: running the CLI and the daemon as real processes, reading
the worker table, writing config files, a real notify socket. Fixtures live in conftest.py;
this module holds only plain functions and classes, imported by name."""

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import yaml

ATTUNE_SENSOR = str(Path(sys.executable).with_name("attune-sensor"))
_counter = itertools.count()


def unique_name(prefix):
    """A database or file name no other test of this run uses."""
    return f"{prefix}{os.getpid()}_{next(_counter)}"


def wait_for(predicate, timeout=15.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def attune_database(cluster, attune_template, search_path=True, migrate=True):
    """A fresh Attune-flavour database. `search_path`: the platform's own set-up, ALTER DATABASE
    ... SET search_path (not copied from a template); without it only schema attune finds the
    tables. `migrate`: after 'attune-sensor migrate run' (the daemon role's grants)."""
    name = unique_name("a")
    cluster.psql(f"CREATE DATABASE {name} TEMPLATE {attune_template}")
    if search_path:
        cluster.psql(f"ALTER DATABASE {name} SET search_path TO attune, public")
    url = cluster.url(name)
    if migrate:
        result = run_cli("migrate", "run", env={"DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
    return url


def spec_database(cluster, template_db):
    name = unique_name("t")
    cluster.psql(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    return cluster.url(name)


def query(url, sql, params=None):
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def worker_row(url, name):
    # public first (the spec's flavour), then attune: the platform's schema, with or without its
    # database-level search_path setting
    rows = query(url, "SET search_path TO public, attune; "
                      "SELECT id, status::text, worker_role::text, capabilities, meta, last_heartbeat, host, "
                      "worker_type::text FROM worker WHERE name = %s", (name,))
    assert len(rows) <= 1
    if not rows:
        return None
    keys = ("id", "status", "role", "capabilities", "meta", "last_heartbeat", "host", "worker_type")
    return dict(zip(keys, rows[0]))


def add_pending_sensors(url, count, runtime, prefix="s."):
    """`count` sensors waiting for a worker, as `place` leaves them when none can take them."""
    query(url, "INSERT INTO attune_sensor.assignment (sensor_ref, runtime) "
               "SELECT %s || n, %s FROM generate_series(1, %s) AS n", (prefix, runtime, count))


def base_env(extra=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ATTUNE") and k not in ("DATABASE_URL", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                       "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(*args, env=None, timeout=60):
    return subprocess.run([ATTUNE_SENSOR, *args], env=base_env(env), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


def write_config(directory, data):
    path = Path(directory) / f"{unique_name('config-')}.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, directory):
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode())

    def fields(self):
        """Every KEY=VALUE line received, in order."""
        with self._lock:
            return [line for message in self.messages for line in message.split("\n") if line]

    def count(self, prefix):
        return sum(1 for f in self.fields() if f.startswith(prefix))

    def wait_for(self, prefix, count=1, timeout=15):
        return wait_for(lambda: self.count(prefix) >= count, timeout, what=f"{count} x {prefix} on the notify socket")

    def close(self):
        self._stop = True
        self._thread.join(1)
        self.sock.close()


class Daemon:
    """`attune-sensor run` as a real subprocess; output is collected from both streams."""

    def __init__(self, config_path, env=None, notify=None):
        extra = dict(env or {})
        if notify is not None:
            extra["NOTIFY_SOCKET"] = notify.path
        self.proc = subprocess.Popen([ATTUNE_SENSOR, "--config", config_path, "run"], env=base_env(extra),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self):
        return "\n".join(self.lines)

    def wait_for_line(self, text, count=1, timeout=20):
        try:
            return wait_for(lambda: sum(text in line for line in self.lines) >= count, timeout,
                            what=f"{count} log line(s) containing {text!r}")
        except AssertionError as exc:  # with the output as it is now, not as it was at the call
            raise AssertionError(f"{exc}; got:\n{self.output}") from None

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=20):
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


def config_for(directory, url, name, **sensor):
    """A daemon config: a fast heartbeat (0.5 s) unless given."""
    sensor.setdefault("heartbeat_interval", 0.5)
    return write_config(directory, {"database": {"url": url}, "sensor": {"worker_name": name, **sensor}})


# config files each test module may use to check a refusal: (data, key named, reason)
URL = "postgresql://attune:s3cret-pw@db.example.net:5432/attune"

BAD = [
    ({"database": {"url": URL}, "sensor": {"heartbeat_interval": "abc"}}, "sensor.heartbeat_interval", "positive number"),
    ({"database": {"url": URL}, "sensor": {"heartbeat_interval": 0}}, "sensor.heartbeat_interval", "greater than 0"),
    ({"database": {"url": URL}, "sensor": {"heartbeat_interval": -5}}, "sensor.heartbeat_interval", "greater than 0"),
    ({"database": {"url": URL}, "sensor": {"poll_interval": True}}, "sensor.poll_interval", "positive number"),
    ({"database": {"url": URL}, "sensor": {"max_concurrent_sensors": 2.5}}, "sensor.max_concurrent_sensors", "whole number"),
    ({"database": {"url": URL}, "log": {"level": "loud"}}, "log.level", "debug, info, warning, error"),
    ({"database": {"url": URL}, "log": {"format": "xml"}}, "log.format", "text, json"),
    ({"database": {"url": "mysql://a@b/c"}}, "database.url", "scheme"),
    ({"database": {"url": "not a url"}}, "database.url", "neither"),
    ({"database": {"url": URL}, "sensor": {"heartbeat_intervall": 5}}, "sensor.heartbeat_intervall", "unknown setting"),
    ({"database": {"url": URL}, "sensors": {}}, "sensors", "unknown section"),
    ({"database": {"url": URL}, "sensor": {"worker_name": "x'; DROP TABLE worker;--"}}, "sensor.worker_name", "letters"),
    ({"database": {"url": URL}, "sensor": {"worker_name": "a" * 10000}}, "sensor.worker_name", "1-128"),
    ({"database": {"url": URL}, "sensor": {"worker_name": "bad\nname"}}, "sensor.worker_name", "letters"),
    ({"database": {"url": URL}, "sensor": {"capabilities": {"runtimes": ["py thon"]}}}, "sensor.capabilities.runtimes", "invalid runtime"),
    ({"database": {"url": URL}, "sensor": {"capabilities": {"blob": "x" * 20000}}}, "sensor.capabilities", "bytes"),
    ({"database": {"url": URL}, "sensor": {"capabilities": ["python"]}}, "sensor.capabilities", "mapping"),
    ({"sensor": {"heartbeat_interval": 5}}, "database.url", "not set"),
    ("sensor: [unclosed\n", "YAML syntax error at line", ""),
    ("- just\n- a list\n", "must be a mapping", ""),
]
