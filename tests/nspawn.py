"""A booted Debian bookworm with systemd as PID 1, in systemd-nspawn, for the package test.

The recipe is the one verified on these machines (docs/development.md, "The package test"): debootstrap a
minbase rootfs once (cached), copy it per run, boot it with --keep-unit --register=no in the
background, and run commands inside with nsenter. The container shares the host's network, so
a PostgreSQL on 127.0.0.1 is reachable from inside.

    python3 tests/nspawn.py prepare    # build the cached rootfs (about a minute)
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

CACHE = os.environ.get("ATTUNE_NSPAWN_CACHE", "/var/cache/attune-sensor-test")
# The package's dependencies are in the cached image so installing the .deb needs no download.
INCLUDE = ("systemd,systemd-sysv,dbus,python3,python3-psycopg2,python3-yaml,python3-sdnotify,"
           "python3-pythonjsonlogger,procps")
ROOTFS_VERSION = "v1"
MIRROR = "http://deb.debian.org/debian"
SOURCES = (f"deb {MIRROR} bookworm main\n"
           f"deb {MIRROR} bookworm-updates main\n"
           "deb http://deb.debian.org/debian-security bookworm-security main\n")


def missing_tools():
    needed = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap", "nsenter": "util-linux"}
    return [f"{tool} (apt-get install {pkg})" for tool, pkg in needed.items() if not shutil.which(tool)]


def cached_rootfs():
    """The pristine rootfs, built on first use."""
    path = os.path.join(CACHE, f"bookworm-{ROOTFS_VERSION}")
    if os.path.exists(os.path.join(path, ".complete")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(CACHE, exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", "bookworm", path, MIRROR],
                   check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(path, "etc/apt/sources.list"), "w") as handle:
        handle.write(SOURCES)
    # A fixed identity keeps the test deterministic; each copy gets its own machine-id below.
    with open(os.path.join(path, "etc/hostname"), "w") as handle:
        handle.write("sensor-box\n")
    open(os.path.join(path, ".complete"), "w").close()
    return path


class Container:
    def __init__(self, workdir=None):
        self.base = tempfile.mkdtemp(prefix="attune-nspawn-", dir=workdir or "/var/tmp")
        self.root = os.path.join(self.base, "rootfs")
        self.proc = None
        self.leader = None

    def boot(self):
        subprocess.run(["cp", "-a", "--reflink=auto", cached_rootfs(), self.root], check=True)
        os.unlink(os.path.join(self.root, ".complete"))
        with open(os.path.join(self.root, "etc/machine-id"), "w") as handle:
            handle.write(os.urandom(16).hex() + "\n")
        self.console = open(os.path.join(self.base, "console.log"), "w")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", self.root, "--boot", "--register=no", "--keep-unit", "-q",
             "--machine", "sensor-box"],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.leader = self._find_leader()
            if self.leader:
                state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"container did not boot; console:\n{self.console_text()}")

    def _find_leader(self):
        # systemd-nspawn's child is the container's PID 1 (systemd).
        result = subprocess.run(["pgrep", "-P", str(self.proc.pid)], stdout=subprocess.PIPE, text=True)
        for pid in result.stdout.split():
            try:
                with open(f"/proc/{pid}/comm") as handle:
                    if handle.read().strip() == "systemd":
                        return pid
            except OSError:
                continue  # a short-lived helper of nspawn's, gone between pgrep and open
        return None

    def console_text(self):
        with open(os.path.join(self.base, "console.log")) as handle:
            return handle.read()[-4000:]

    def run(self, *argv, check=True, timeout=120, input=None):
        result = subprocess.run(["nsenter", "-t", self.leader, "-a", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}")
        return result

    def sh(self, script, check=True, timeout=120):
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout)

    def put(self, source, dest):
        """Copies a host file into the container (not /tmp: nspawn mounts a tmpfs there)."""
        target = os.path.join(self.root, dest.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(source, target)
        return dest

    def write(self, dest, text):
        """Writes a file inside the container through its own view of the filesystem."""
        self.run("/bin/sh", "-c", f"cat > '{dest}'", input=text)

    def shutdown(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to nspawn: a clean container shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if getattr(self, "console", None):
            self.console.close()
        shutil.rmtree(self.base, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["prepare"]:
        print(cached_rootfs())
    else:
        print(__doc__)
        sys.exit(2)
