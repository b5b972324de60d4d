"""Shared fixtures: a real PostgreSQL cluster, databases migrated from a template, a real
systemd notify socket, and the real daemon as a subprocess. Plain helpers are in support.py."""

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "packaging"))  # pgcluster.py: shared with the demo and the benches
import platform_db  # noqa: E402
from pgcluster import Cluster  # noqa: E402
from support import Daemon, NotifySocket, attune_database, run_cli, spec_database, unique_name  # noqa: E402


# No test may wait forever for an event that never comes: it fails after this many seconds
# (its function-scoped fixtures included) and the run goes on.
TEST_TIMEOUT = int(os.environ.get("ATTUNE_TEST_TIMEOUT", "600"))


@pytest.fixture(autouse=True)
def _test_timeout():
    def expired(signum, frame):
        raise TimeoutError(f"this test ran longer than {TEST_TIMEOUT}s (ATTUNE_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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


@pytest.fixture
def empty_db_url(cluster):
    name = unique_name("e")
    cluster.psql(f"CREATE DATABASE {name}")
    return cluster.url(name)


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(str(tmp_path))
    yield sock
    sock.close()


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
