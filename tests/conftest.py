"""Shared fixtures: a real PostgreSQL cluster, databases migrated from a template, a real
systemd notify socket, and the real daemon as a subprocess."""

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import platform_db  # noqa: E402
from pgcluster import Cluster  # noqa: E402

ATTUNE_SENSOR = str(Path(sys.executable).with_name("attune-sensor"))
_counter = itertools.count()


def wait_for(predicate, timeout=15.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def cluster():
    cluster = Cluster().init().start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def template_db(cluster):
    cluster.psql("CREATE DATABASE attune_template")
    url = cluster.url("attune_template")
    result = run_cli("migrate", "run", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    return "attune_template"


@pytest.fixture(scope="session")
def attune_templates(cluster):
    """Attune-flavour template databases by source (platform_db.py), built on first use: as the
    platform's own migrations left them, nothing of attune-sensor's yet."""
    built = {}

    def get(source):
        if source not in built:
            if source == "platform":
                reason = platform_db.platform_missing_reason()
                if reason:
                    if platform_db.REQUIRE_PLATFORM:
                        pytest.fail(reason + "; ATTUNE_SENSOR_REQUIRE_PLATFORM_SCHEMA=1 requires them")
                    pytest.skip(reason)
            name = f"attune_{source}_template"
            cluster.psql(f"CREATE DATABASE {name}")
            platform_db.build(cluster.url(name), source)
            built[source] = name
        return built[source]

    return get


@pytest.fixture(scope="session")
def attune_template(attune_templates):
    return attune_templates("fixture")


def attune_database(cluster, attune_template, search_path=True, migrate=True):
    """A fresh Attune-flavour database. `search_path`: the platform's own set-up, ALTER DATABASE
    ... SET search_path (not copied from a template); without it only schema attune finds the
    tables. `migrate`: after 'attune-sensor migrate run' (the daemon role's grants)."""
    name = f"a{os.getpid()}_{next(_counter)}"
    cluster.psql(f"CREATE DATABASE {name} TEMPLATE {attune_template}")
    if search_path:
        cluster.psql(f"ALTER DATABASE {name} SET search_path TO attune, public")
    url = cluster.url(name)
    if migrate:
        result = run_cli("migrate", "run", env={"DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
    return url


@pytest.fixture(params=["spec", "attune"])
def db_url(request, cluster, template_db):
    """A fresh, migrated database of its own for each test, in each flavour: the spec's schema
    (attune-sensor's migrations) and the Attune platform's (with its search_path setting)."""
    if request.param == "attune":
        return attune_database(cluster, request.getfixturevalue("attune_template"))
    return spec_database(cluster, template_db)


@pytest.fixture
def spec_db_url(cluster, template_db):
    """The spec's schema only: for what attune-sensor's own migrations build."""
    return spec_database(cluster, template_db)


@pytest.fixture
def attune_url(cluster, attune_template):
    """The Attune flavour without the search_path setting: only schema attune finds the tables."""
    return attune_database(cluster, attune_template, search_path=False)


def spec_database(cluster, template_db):
    name = f"t{os.getpid()}_{next(_counter)}"
    cluster.psql(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    return cluster.url(name)


@pytest.fixture
def empty_db_url(cluster):
    name = f"e{os.getpid()}_{next(_counter)}"
    cluster.psql(f"CREATE DATABASE {name}")
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
    path = Path(directory) / f"config-{next(_counter)}.yaml"
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


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(str(tmp_path))
    yield sock
    sock.close()


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
        return wait_for(lambda: sum(text in line for line in self.lines) >= count, timeout,
                        what=f"{count} log line(s) containing {text!r}; got:\n{self.output}")

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


@pytest.fixture
def daemons():
    started = []

    def start(config_path, env=None, notify=None):
        daemon = Daemon(config_path, env, notify)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="attune-test-") as directory:
        yield directory
