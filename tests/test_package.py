"""The .deb under a real systemd: build it, boot Debian bookworm in systemd-nspawn, install it
with apt as an operator would, and check each promise by querying the database or the journal.

The steps share one container and run in file order; each leaves the service as the next
expects. Needs root and systemd-nspawn: without them this fails, saying what is missing.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

from support import attune_database, query, wait_for, worker_row
from nspawn import Container, missing_tools
from pgcluster import ADMIN_PASSWORD

pytestmark = pytest.mark.systemd
ROOT = Path(__file__).resolve().parent.parent
UNIT = "attune-sensor"
# Short timings so the watchdog and restart paths run in seconds; the shipped values are longer.
DROPIN = "[Service]\nWatchdogSec=8s\nRestartSec=1s\n"
INTERVAL = 2


def build_deb(version=None):
    env = dict(os.environ)
    if version:
        env["ATTUNE_DEB_VERSION"] = version
    result = subprocess.run(["bash", "packaging/build-deb.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout
    return next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("built "))


@pytest.fixture(scope="module")
def box():
    problems = []
    if os.geteuid() != 0:
        problems.append("root")
    problems += missing_tools()
    if problems:
        pytest.fail("the systemd package test needs: " + ", ".join(problems) + " (run packaging/install-deps.sh as root)")
    container = Container()
    try:
        container.boot()
        yield container
    finally:
        container.shutdown()


@pytest.fixture(scope="module")
def pkg_db(cluster, template_db):
    cluster.psql(f"CREATE DATABASE package_test TEMPLATE {template_db}")
    return cluster.url("package_test")


def show(box, prop, unit=UNIT):
    return box.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()


def journal(box, unit=UNIT):
    return box.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout


def write_config(box, url, name="sensor-box", path="/etc/attune/config.yaml", **extra):
    lines = [f"database:\n  url: '{url}'\n", f"sensor:\n  worker_name: {name}\n  heartbeat_interval: {INTERVAL}\n"]
    lines += [f"  {key}: {value}\n" for key, value in extra.items()]
    box.write(path, "".join(lines))


def test_install_enables_without_starting_until_configured(box):
    deb = build_deb()
    box.put(str(ROOT / deb), "/root/" + os.path.basename(deb))
    box.sh(f"cd /root && apt-get install -y ./{os.path.basename(deb)}", timeout=300)
    assert box.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert show(box, "ActiveState") == "inactive"
    assert box.run("systemctl", "is-failed", UNIT, check=False).stdout.strip() != "failed"
    assert "database.url is not set" in journal(box)
    assert box.run("stat", "-c", "%U:%G %a", "/etc/attune/config.yaml").stdout.strip() == "root:attune 640"
    assert box.run("getent", "passwd", "attune").returncode == 0
    # minbase has no man-db to resolve Documentation=man:...; the page itself is checked instead
    assert box.run("test", "-f", "/usr/share/man/man1/attune-sensor.1.gz", check=False).returncode == 0
    verify = box.run("systemd-analyze", "verify", "--man=no", f"{UNIT}.service", f"{UNIT}@x.service", check=False)
    assert verify.returncode == 0 and verify.stdout.strip() == "", verify.stdout


def test_installs_the_operator_docs_and_reports_the_packages_version(box):
    for doc in ("README.md", "operations.md", "scheduling.md", "performance.md"):
        assert box.run("test", "-f", f"/usr/share/doc/attune-sensor/{doc}.gz", check=False).returncode == 0, doc
    version = box.run("dpkg-query", "-W", "-f=${Version}", "attune-sensor").stdout
    assert box.run("attune-sensor", "--version").stdout.strip() == f"attune-sensor {version}"


def test_start_registers_and_heartbeats_at_the_interval(box, pkg_db):
    box.run("mkdir", "-p", f"/etc/systemd/system/{UNIT}.service.d")
    box.write(f"/etc/systemd/system/{UNIT}.service.d/test.conf", DROPIN)
    box.run("systemctl", "daemon-reload")
    write_config(box, pkg_db)
    box.run("systemctl", "start", UNIT)  # Type=notify: returns once READY=1 arrived
    assert show(box, "ActiveState") == "active"
    row = worker_row(pkg_db, "sensor-box")
    assert row["status"] == "active" and row["role"] == "sensor"
    assert {"python", "shell", "native"} <= set(row["capabilities"]["runtimes"])
    assert row["meta"]["invocation_id"] == show(box, "InvocationID")
    wait_for(lambda: journal(box).count("heartbeat: worker sensor-box") >= 4, 30, what="4 heartbeats in the journal")
    stamps = [float(line.split()[0]) for line in box.run(
        "journalctl", "-u", UNIT, "-o", "short-unix", "--no-pager", "-g", "heartbeat: worker").stdout.splitlines()
        if line and line[0].isdigit()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert gaps and all(INTERVAL * 0.5 < gap < INTERVAL * 1.5 for gap in gaps), gaps


def test_reload_updates_capabilities_without_restart(box, pkg_db):
    pid = show(box, "MainPID")
    write_config(box, pkg_db, max_concurrent_sensors=4, capabilities="{runtimes: [python, shell], reloaded: true}")
    box.run("systemctl", "reload", UNIT)
    caps = wait_for(lambda: (c := worker_row(pkg_db, "sensor-box")["capabilities"]).get("reloaded") and c, 15,
                    what="reloaded capabilities")
    assert caps["runtimes"] == ["python", "shell"] and caps["max_concurrent_sensors"] == 4
    assert show(box, "MainPID") == pid and show(box, "ActiveState") == "active"


def test_a_long_interval_moves_the_watchdog_instead_of_failing_and_a_reload_moves_it_back(box, pkg_db):
    # 60 s (the platform seed's) is over half of WatchdogSec (8 s here, 90 s shipped): the daemon asks
    # systemd for 3 x 60 s rather than refusing
    assert show(box, "WatchdogUSec") == "8s"  # 3 x 2 s is less: the unit's value stays
    box.write("/etc/attune/config.yaml", f"database:\n  url: '{pkg_db}'\nsensor:\n  worker_name: sensor-box\n"
                                         "  heartbeat_interval: 60\n")
    box.run("systemctl", "restart", UNIT)
    assert show(box, "ActiveState") == "active" and show(box, "WatchdogUSec") == "3min"
    assert worker_row(pkg_db, "sensor-box")["capabilities"]["heartbeat_interval"] == 60
    write_config(box, pkg_db)
    box.run("systemctl", "reload", UNIT)
    wait_for(lambda: show(box, "WatchdogUSec") == "8s", 15, what="the watchdog back at WatchdogSec")
    wait_for(lambda: worker_row(pkg_db, "sensor-box")["capabilities"]["heartbeat_interval"] == INTERVAL, 15,
             what="the reloaded interval stored")
    box.run("systemctl", "restart", UNIT)  # the 2 s rhythm again, for the steps that follow


def test_a_placed_sensor_runs_inside_the_unit_with_the_token_from_its_credential(box, pkg_db):
    # the package installed an empty token file, root-only; the operator writes the token
    assert box.run("stat", "-c", "%U:%G %a %s", "/etc/attune/api-token").stdout.strip() == "root:root 600 0"
    box.write("/etc/attune/api-token", "box-token-7\n")
    box.run("mkdir", "-p", "/opt/attune/packs/demo/sensors")
    box.write("/opt/attune/packs/demo/sensors/env.sh",
              'echo "token=$ATTUNE_API_TOKEN user=$(id -un) ref=$ATTUNE_SENSOR_REF"\nwhile true; do sleep 1; done\n')
    box.run("systemctl", "restart", UNIT)  # credentials are read at start
    placed = box.run("attune-sensor", "place", "demo.env", "--runtime", "shell", "--entrypoint", "demo/sensors/env.sh")
    assert placed.stdout.strip() == "sensor-box"
    box.run("systemctl", "reload", UNIT)  # at once, not at the next read
    wait_for(lambda: "sensor demo.env: token=box-token-7 user=attune ref=demo.env" in journal(box), 20,
             what="the sensor's line in the journal")
    listing = box.run("attune-sensor", "assignments").stdout
    assert "demo.env" in listing and "running" in listing
    # the credential, not the file: the daemon's user cannot read /etc/attune/api-token itself
    assert box.run("runuser", "-u", "attune", "--", "cat", "/etc/attune/api-token", check=False).returncode != 0
    box.run("attune-sensor", "unplace", "demo.env")
    box.run("systemctl", "reload", UNIT)
    wait_for(lambda: "sensor demo.env stopped" in journal(box), 20, what="the sensor stopped")


def test_frozen_process_is_killed_by_the_watchdog_and_comes_back(box, pkg_db):
    worker_id = worker_row(pkg_db, "sensor-box")["id"]
    restarts = int(show(box, "NRestarts"))
    box.run("systemctl", "kill", "-s", "SIGSTOP", UNIT)
    wait_for(lambda: int(show(box, "NRestarts")) > restarts, 40, what="a watchdog restart")
    wait_for(lambda: show(box, "ActiveState") == "active", 30, what="the unit active again")
    assert "Watchdog timeout" in box.run("journalctl", "--no-pager", "-o", "cat").stdout
    # the row now belongs to the new process, under the same id
    new_pid = int(show(box, "MainPID"))
    row = worker_row(pkg_db, "sensor-box")
    assert row["id"] == worker_id and row["status"] == "active"
    assert row["meta"]["invocation_id"] == show(box, "InvocationID")
    assert new_pid > 0


def test_database_outage_longer_than_the_watchdog_does_not_restart(box, pkg_db, cluster):
    restarts = show(box, "NRestarts")
    cluster.stop("fast")
    try:
        time.sleep(12)  # longer than WatchdogSec=8s
        assert show(box, "NRestarts") == restarts and show(box, "ActiveState") == "active"
        # the priority prefixes reach journald: failures are warnings, heartbeats are not
        warnings = box.run("journalctl", "-u", UNIT, "-p", "warning", "--no-pager", "-o", "cat").stdout
        assert "heartbeat failed for worker sensor-box" in warnings
        assert "heartbeat: worker sensor-box" not in warnings
    finally:
        cluster.start()
    before = time.time()
    wait_for(lambda: worker_row(pkg_db, "sensor-box")["last_heartbeat"].timestamp() > before, 20,
             what="a heartbeat after the database returned")
    assert worker_row(pkg_db, "sensor-box")["status"] == "active"


def test_invalid_config_fails_once_without_a_restart_loop(box, pkg_db):
    write_config(box, pkg_db, max_concurrent_sensors="many")
    box.run("systemctl", "restart", UNIT, check=False)
    wait_for(lambda: show(box, "ActiveState") == "failed", 20, what="the unit failed")
    time.sleep(3)  # a restart loop would show within RestartSec=1s
    assert show(box, "ActiveState") == "failed" and show(box, "ExecMainStatus") == "78"
    invocation = show(box, "InvocationID")
    lines = box.run("journalctl", f"_SYSTEMD_INVOCATION_ID={invocation}", "--no-pager", "-o", "cat").stdout
    assert lines.count("sensor.max_concurrent_sensors (in /etc/attune/config.yaml): must be a whole number") == 1
    assert "Traceback" not in lines
    write_config(box, pkg_db)
    box.run("systemctl", "reset-failed", UNIT)
    box.run("systemctl", "start", UNIT)


def test_stop_marks_the_worker_inactive(box, pkg_db):
    box.run("systemctl", "stop", UNIT)
    # systemctl stop returns when the process has exited, after it deregistered
    assert worker_row(pkg_db, "sensor-box")["status"] == "inactive"
    assert show(box, "ActiveState") == "inactive" and show(box, "ExecMainStatus") == "0"


def test_password_never_reaches_the_journal_or_process_list(box):
    everything = box.run("journalctl", "--no-pager", "-o", "cat").stdout
    assert ADMIN_PASSWORD not in everything
    box.run("systemctl", "start", UNIT)
    assert ADMIN_PASSWORD not in box.run("ps", "axww", "-o", "args").stdout
    assert ADMIN_PASSWORD not in box.run("attune-sensor", "config").stdout


def test_template_instances_register_their_own_workers(box, pkg_db):
    for instance in ("a", "b"):
        write_config(box, pkg_db, name=f"sensor-box-{instance}", path=f"/etc/attune/sensor-{instance}.yaml")
    box.run("systemctl", "start", f"{UNIT}@a", f"{UNIT}@b")
    for instance in ("a", "b"):
        assert worker_row(pkg_db, f"sensor-box-{instance}")["status"] == "active"
    box.run("systemctl", "stop", f"{UNIT}@a", f"{UNIT}@b")
    assert worker_row(pkg_db, "sensor-box-a")["status"] == "inactive"


def test_on_an_attune_platform_database_the_package_migrates_and_runs(box, cluster, attune_template):
    # the harder of the platform's set-ups: no search_path setting, only schema attune finds it
    url = attune_database(cluster, attune_template, search_path=False, migrate=False)
    migrated = box.run("env", f"DATABASE_URL={url}", "attune-sensor", "migrate", "run")
    assert "Attune platform's schema" in migrated.stdout
    dbname = url.rsplit("/", 1)[1]
    cluster.psql(f"CREATE ROLE box_{dbname} LOGIN PASSWORD 'box-pw' IN ROLE attune_sensor_daemon")
    daemon_url = f"postgresql://box_{dbname}:box-pw@127.0.0.1:{cluster.port}/{dbname}"
    box.write("/etc/attune/sensor-attune.yaml", f"database:\n  url: '{daemon_url}'\nsensor:\n  worker_name: sensor-box-attune\n")
    box.run("systemctl", "start", f"{UNIT}@attune")
    found = query(url, "SELECT status::text, capabilities FROM attune.worker WHERE name = 'sensor-box-attune'")
    assert found[0][0] == "active" and found[0][1]["heartbeat_interval"] == 10  # the platform's health rule
    assert show(box, "WatchdogUSec", f"{UNIT}@attune") == "1min 30s"  # the shipped WatchdogSec
    # the platform's seed sets ATTUNE__SENSOR__HEARTBEAT_INTERVAL=60: accepted under the shipped unit, the
    # watchdog moved to 3 x 60 s, one warning about healthy_workers
    box.run("mkdir", "-p", f"/etc/systemd/system/{UNIT}@attune.service.d")
    box.write(f"/etc/systemd/system/{UNIT}@attune.service.d/seed.conf",
              "[Service]\nEnvironment=ATTUNE__SENSOR__HEARTBEAT_INTERVAL=60\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", f"{UNIT}@attune")
    assert show(box, "ActiveState", f"{UNIT}@attune") == "active"
    assert show(box, "WatchdogUSec", f"{UNIT}@attune") == "3min"
    found = query(url, "SELECT capabilities FROM attune.worker WHERE name = 'sensor-box-attune'")
    assert found[0][0]["heartbeat_interval"] == 60
    invocation = show(box, "InvocationID", f"{UNIT}@attune")
    lines = box.run("journalctl", f"_SYSTEMD_INVOCATION_ID={invocation}", "--no-pager", "-o", "cat").stdout
    assert lines.count("healthy_workers") == 1 and "systemd watchdog: 180s" in lines
    box.run("rm", "-r", f"/etc/systemd/system/{UNIT}@attune.service.d")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "stop", f"{UNIT}@attune")
    assert query(url, "SELECT status::text FROM attune.worker WHERE name = 'sensor-box-attune'") == [("inactive",)]
    assert "box-pw" not in journal(box, f"{UNIT}@attune")


def upgrade_to(box, version):
    deb = build_deb(version=version)
    box.put(str(ROOT / deb), "/root/" + os.path.basename(deb))
    box.sh(f"cd /root && apt-get install -y ./{os.path.basename(deb)}", timeout=300)
    assert box.run("dpkg-query", "-W", "-f=${Version}", "attune-sensor").stdout == version


def test_upgrade_leaves_a_stopped_service_stopped(box, pkg_db):
    box.run("systemctl", "stop", UNIT)
    upgrade_to(box, "0.1.0+upgrade1")
    assert show(box, "ActiveState") == "inactive"
    assert worker_row(pkg_db, "sensor-box")["status"] == "inactive"


def test_upgrade_keeps_the_edited_config_and_restarts_a_running_service(box, pkg_db):
    box.run("systemctl", "start", UNIT)
    pid = show(box, "MainPID")
    upgrade_to(box, "0.1.0+upgrade2")
    assert pkg_db.split("@")[1] in box.run("cat", "/etc/attune/config.yaml").stdout
    wait_for(lambda: show(box, "ActiveState") == "active" and show(box, "MainPID") not in ("0", pid), 30,
             what="a restarted service")
    assert worker_row(pkg_db, "sensor-box")["status"] == "active"


def test_the_upgraded_package_reports_its_own_version(box, pkg_db):
    assert box.run("attune-sensor", "--version").stdout.strip() == "attune-sensor 0.1.0+upgrade2"
    wait_for(lambda: worker_row(pkg_db, "sensor-box")["capabilities"].get("sensor_version") == "0.1.0+upgrade2", 20,
             what="the restarted worker's sensor_version")


def test_remove_stops_every_worker_and_purge_leaves_nothing(box, pkg_db):
    box.run("systemctl", "start", f"{UNIT}@a")
    assert worker_row(pkg_db, "sensor-box-a")["status"] == "active"
    box.run("apt-get", "remove", "-y", "attune-sensor", timeout=300)
    assert worker_row(pkg_db, "sensor-box")["status"] == "inactive"
    assert worker_row(pkg_db, "sensor-box-a")["status"] == "inactive"
    box.run("apt-get", "purge", "-y", "attune-sensor", timeout=300)
    for path in ("/etc/attune", "/var/lib/attune-sensor", "/lib/systemd/system/attune-sensor.service",
                 "/usr/bin/attune-sensor"):
        assert box.run("test", "-e", path, check=False).returncode == 1, path
    assert "/etc/attune" not in box.run("dpkg-statoverride", "--list").stdout
    assert query(pkg_db, "SELECT count(*) FROM worker WHERE status = 'active'")[0][0] == 0


PLATFORM_UNIT = "[Unit]\nDescription=the Attune platform's own sensor service\n[Service]\nExecStart=/bin/true\n"


def test_the_platforms_all_in_one_package_and_this_one_are_never_installed_together(box):
    # a stand-in for the platform's package `attune`: its sensor service's unit at /usr/lib, which on
    # this merged-/usr system is the file the attune-sensor package ships at /lib
    root = "/root/attune-pkg"
    box.run("mkdir", "-p", f"{root}/DEBIAN", f"{root}/usr/lib/systemd/system")
    box.write(f"{root}/DEBIAN/control", "Package: attune\nVersion: 0.9.0\nArchitecture: all\n"
                                        "Maintainer: Attune <attune@example.org>\nDescription: the Attune platform\n")
    box.write(f"{root}/usr/lib/systemd/system/attune-sensor.service", PLATFORM_UNIT)
    box.run("dpkg-deb", "--build", "--root-owner-group", root, "/root/attune_0.9.0_all.deb")
    box.run("dpkg", "-i", "/root/attune_0.9.0_all.deb")
    ours = box.sh("ls /root/attune-sensor_*_all.deb | tail -1").stdout.strip()
    refused = box.run("dpkg", "-i", ours, check=False)
    assert refused.returncode != 0 and "conflict" in refused.stdout.lower()
    assert box.run("cat", "/usr/lib/systemd/system/attune-sensor.service").stdout == PLATFORM_UNIT
    assert box.run("dpkg-query", "-W", "-f=${Status}", "attune-sensor", check=False).stdout != "install ok installed"
    box.run("dpkg", "--purge", "attune")
