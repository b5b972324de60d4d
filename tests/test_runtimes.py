"""Runtime detection: environment > config > probing real binaries on PATH."""

import os
import stat

import pytest

from attune_sensor.worker import runtimes


def fake_bin(directory, name, exit_code=0, prints=""):
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        handle.write(f"#!/bin/sh\n[ \"$1\" = --version ] || exit 9\n[ -z \"$NOTIFY_SOCKET\" ] || exit 7\n"
                     f"printf '%s' '{prints}'\nexit {exit_code}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def test_detection_runs_the_binaries(tmp_path):
    fake_bin(tmp_path, "python3")
    fake_bin(tmp_path, "node", exit_code=1)  # present but broken: not a runtime
    env = {"PATH": tmp_path}
    assert runtimes.resolve((), env)[:2] == (["python", "shell", "native"], "detected")


def test_detection_falls_back_to_python_and_finds_node(tmp_path):
    fake_bin(tmp_path, "python")
    fake_bin(tmp_path, "node")
    assert runtimes.resolve((), {"PATH": tmp_path})[0] == ["python", "node", "shell", "native"]


def test_probes_do_not_inherit_the_notify_socket(tmp_path):
    fake_bin(tmp_path, "python3")  # exits 7 when it sees NOTIFY_SOCKET
    found, _, _ = runtimes.resolve((), {"PATH": tmp_path, "NOTIFY_SOCKET": "/run/systemd/notify"})
    assert "python" in found


def test_empty_path_still_has_shell_and_native(tmp_path):
    assert runtimes.resolve((), {"PATH": tmp_path}) == (["shell", "native"], "detected", [])


def test_config_beats_detection_and_environment_beats_config(tmp_path):
    fake_bin(tmp_path, "python3")
    assert runtimes.resolve(("node",), {"PATH": tmp_path}) == (["node"], "config", [])
    env = {"PATH": tmp_path, "ATTUNE_SENSOR_RUNTIMES": " Python, shell,,python ,NODE "}
    assert runtimes.resolve(("node",), env) == (["python", "shell", "node"], "environment", [])
    # set but empty counts as unset
    assert runtimes.resolve(("node",), {"PATH": tmp_path, "ATTUNE_SENSOR_RUNTIMES": " , "}) == (["node"], "config", [])


@pytest.mark.parametrize("value", ["py thon", "x" * 40, "a;b", "ü"])
def test_bad_names_in_the_variable_are_named(value):
    with pytest.raises(ValueError, match="ATTUNE_SENSOR_RUNTIMES"):
        runtimes.resolve((), {"ATTUNE_SENSOR_RUNTIMES": value})


def test_a_hanging_binary_is_not_a_runtime_and_is_not_left_running(tmp_path, monkeypatch):
    path = os.path.join(tmp_path, "node")
    pidfile = os.path.join(tmp_path, "node.pid")
    with open(path, "w") as handle:
        handle.write(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 30\n")
    os.chmod(path, 0o755)
    monkeypatch.setattr(runtimes, "PROBE_TIMEOUT", 0.5)
    found, _, _ = runtimes.resolve((), {"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert "node" not in found and found[-2:] == ["shell", "native"]
    with open(pidfile) as handle:
        pid = int(handle.read())
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped


def test_versions_and_interpreters_come_from_the_same_probes(tmp_path):
    fake_bin(tmp_path, "python3", prints="Python 3.11.2")
    fake_bin(tmp_path, "python", prints="Python 2.7.18")
    fake_bin(tmp_path, "node", prints="v18.19.0")
    names, source, interpreters = runtimes.resolve((), {"PATH": tmp_path})
    assert names == ["python", "node", "shell", "native"] and source == "detected"
    assert interpreters == [
        {"name": "python", "path": os.path.join(tmp_path, "python3"), "version": "3.11.2"},
        {"name": "python", "path": os.path.join(tmp_path, "python"), "version": "2.7.18"},
        {"name": "node", "path": os.path.join(tmp_path, "node"), "version": "18.19.0"},
    ]
    assert runtimes.runtime_versions(interpreters) == {"node": ["18.19.0"], "python": ["2.7.18", "3.11.2"]}


def test_a_binary_printing_without_end_is_read_only_in_part(tmp_path, monkeypatch):
    path = os.path.join(tmp_path, "node")
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\necho v20.1.0\nexec yes\n")  # never exits by itself
    os.chmod(path, 0o755)
    monkeypatch.setattr(runtimes, "PROBE_TIMEOUT", 0.5)
    names, _, interpreters = runtimes.resolve((), {"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert "node" not in names and not any(i["name"] == "node" for i in interpreters)


def test_a_probe_printing_without_end_writes_and_is_read_only_a_bounded_amount(tmp_path):
    import sys
    import tracemalloc

    counter = os.path.join(tmp_path, "written")
    path = os.path.join(tmp_path, "python3")
    with open(path, "w") as handle:
        # as fast as it can; before each write it records the total it is about to reach (so
        # a kill between the two counts high, never low). It stops by itself at 64 MiB, so that
        # a reader without a bound fails this test without filling a disk.
        handle.write(f"#!{sys.executable}\n"
                     "import os, time\n"
                     f"count = os.open({counter!r}, os.O_WRONLY)\n"
                     "chunk, total = b'Python 3.11.2\\n' * 4681, 0\n"
                     "while total < 64 << 20:\n"
                     "    os.pwrite(count, str(total + len(chunk)).encode().ljust(20), 0)\n"
                     "    total += os.write(1, chunk)\n"
                     "time.sleep(60)\n")
    with open(counter, "w") as handle:
        handle.write("0")
    os.chmod(path, 0o755)
    tracemalloc.start()
    try:
        names, _, interpreters = runtimes.resolve((), {"PATH": str(tmp_path)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with open(counter) as handle:
        written = int(handle.read())
    # VERSION_BYTES read, then the pipe's buffer (64 KiB; at most fs.pipe-max-size, 1 MiB),
    # and the one write it had announced
    assert written <= runtimes.VERSION_BYTES + (1 << 20) + (64 << 10), written
    assert peak < 1 << 20, peak  # and only a bounded part of it was ever in our memory
    assert "python" not in names and interpreters == []  # too much output: not an interpreter


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_one_interpreter_under_two_names_is_listed_once(tmp_path, link):
    fake_bin(tmp_path, "python3", prints="Python 3.11.2")
    link(os.path.join(tmp_path, "python3"), os.path.join(tmp_path, "python"))
    names, _, interpreters = runtimes.resolve((), {"PATH": str(tmp_path)})
    assert names == ["python", "shell", "native"]
    assert interpreters == [{"name": "python", "path": os.path.join(tmp_path, "python3"), "version": "3.11.2"}]


def test_which_finds_what_shutil_which_finds(tmp_path):
    """launch.which stands in for shutil.which (whose import loads bz2 and lzma into the daemon)."""
    import shutil

    from attune_sensor.runner.launch import which

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "tool").chmod(0o755)
    (tmp_path / "bin" / "plain").write_text("")
    (tmp_path / "bin" / "adir").mkdir()
    path = os.pathsep.join([str(tmp_path / "missing"), str(tmp_path / "bin"), "/usr/bin", "/bin"])
    for command in ("tool", "plain", "adir", "sh", "nonexistent", "/bin/sh", str(tmp_path / "bin" / "tool"),
                    str(tmp_path / "bin" / "plain")):
        assert which(command, path) == shutil.which(command, path=path), command
    assert which("tool", path) == str(tmp_path / "bin" / "tool")
