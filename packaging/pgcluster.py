"""A throwaway PostgreSQL cluster from the distribution's binaries, for tests, benchmarks and
the README's demo. Runs as the `postgres` user when started by root (PostgreSQL refuses root).

    python3 packaging/pgcluster.py start DIR   # prints the admin URL, leaves the server running
    python3 packaging/pgcluster.py stop DIR    # stops it and removes DIR
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile

ADMIN_USER = "attune_admin"
ADMIN_PASSWORD = "throwaway-admin-secret"


def _bindir():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql-15; "
                       "or run packaging/install-deps.sh)")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    def __init__(self, base=None, port=None, settings=()):
        self.bindir = _bindir()
        self.base = base or tempfile.mkdtemp(prefix="attune-pg-")
        self.data = os.path.join(self.base, "data")
        self.logfile = os.path.join(self.base, "server.log")
        self.port = port or free_port()
        self.settings = list(settings)
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chmod(self.base, 0o755)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)

    def _run(self, *argv, check=True, **kwargs):
        argv = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stdout.strip()}")
        return result

    def init(self):
        pwfile = os.path.join(self.base, "pwfile")
        with open(pwfile, "w") as handle:
            handle.write(ADMIN_PASSWORD + "\n")
        if self.as_postgres:
            shutil.chown(pwfile, "postgres")
        self._run("initdb", "-D", self.data, "-U", ADMIN_USER, "--pwfile", pwfile, "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--locale=C")
        os.unlink(pwfile)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as handle:
            handle.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                         f"unix_socket_directories = '{self.base}'\nfsync = off\n"
                         "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n"
                         "shared_preload_libraries = 'pg_stat_statements'\n")
            for line in self.settings:
                handle.write(line + "\n")
        return self

    def start(self, attempts=3):
        """Starts the server; when the port free_port() chose was taken meanwhile by another
        process (tests and benches start clusters, proxies and daemons side by side), with
        another port. A start that fails otherwise says what the server logged."""
        for attempt in range(attempts):
            result = self._run("pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "60", "start", check=False)
            if result.returncode == 0:
                return self
            log = self._log_tail()
            if "could not bind" not in log and "Address already in use" not in log or attempt == attempts - 1:
                raise RuntimeError(f"pg_ctl start failed ({result.returncode}): {result.stdout.strip()}\n"
                                   f"server log:\n{log}")
            self.port = free_port()
            with open(os.path.join(self.data, "postgresql.conf"), "a") as handle:
                handle.write(f"port = {self.port}\n")  # the last setting of a name wins
        return self

    def _log_tail(self, lines=20):
        try:
            with open(self.logfile, errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self, mode="fast"):
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop", check=False)

    @property
    def running(self):
        return self._run("pg_ctl", "-D", self.data, "status", check=False).returncode == 0

    def url(self, dbname="postgres", user=ADMIN_USER, password=ADMIN_PASSWORD):
        auth = f"{user}:{password}@" if password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql, dbname="postgres"):
        result = self._run("psql", "-h", self.base, "-p", str(self.port), "-U", ADMIN_USER, "-d", dbname,
                           "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-q", "-c", sql)
        return result.stdout.strip()

    def destroy(self):
        if os.path.isdir(self.data):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def main(argv):
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    base = os.path.abspath(argv[2])
    if argv[1] == "start":
        os.makedirs(base, exist_ok=True)
        port_file = os.path.join(base, "port")
        port = None
        if os.path.isdir(os.path.join(base, "data")) and os.path.exists(port_file):
            with open(port_file) as handle:
                port = int(handle.read())
        cluster = Cluster(base=base, port=port)
        if port is None:
            shutil.rmtree(cluster.data, ignore_errors=True)
            cluster.init()
        cluster.start()  # may move to another port: the file says the one it listens on
        with open(port_file, "w") as handle:
            handle.write(str(cluster.port))
        print(cluster.url())
        return 0
    port_file = os.path.join(base, "port")
    if os.path.exists(port_file):
        with open(port_file) as handle:
            Cluster(base=base, port=int(handle.read())).destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
