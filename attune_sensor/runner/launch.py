"""What a placement runs: the resolved entrypoint, the command for its runtime, and the child's
environment. The database is not a way onto the host (docs/operations.md, "What the database
may choose"): whoever can write an assignment chooses which of the host's pack scripts runs,
never what code runs. Every function here is pure over the file system and raises LaunchRefused
with a one-line reason.
"""

import os
import re
import stat
from dataclasses import dataclass, field

MAX_ENTRYPOINT = 4096
MAX_ENV_ENTRIES = 64
MAX_ENV_VALUE = 4096
MAX_TRIGGERS = 131072  # ATTUNE_SENSOR_TRIGGERS: the assignment's bound (platform/sensors.py)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Names that change what code runs or where the sensor's traffic and secrets go: the loader, the
# interpreters' start-up hooks and search paths (HOME holds Python's user site-packages), the
# shell's, proxies and TLS trust (which would hand the API token to someone else), and the
# platform's contract and the daemon's own, which only the daemon sets (docs/operations.md,
# "What the database may choose").
FORBIDDEN_ENV_RE = re.compile(
    r"^(PATH|IFS|ENV|BASH_ENV|SHELLOPTS|BASHOPTS|PS4|CDPATH|GCONV_PATH|LOCPATH|GLIBC_TUNABLES|HOSTALIASES|"
    r"RESOLV_HOST_CONF|HOME|USER|LOGNAME|SHELL|TMPDIR|XDG_.*|LD_.*|MALLOC_.*|PYTHON.*|NODE_.*|NPM_.*|PERL.*|"
    r"RUBY.*|GEM_.*|BUNDLE_.*|JAVA_TOOL_OPTIONS|_JAVA_OPTIONS|JDK_JAVA_OPTIONS|CLASSPATH|LUA_.*|TCL.*|"
    r".*_PROXY|SSL_.*|SSLKEYLOGFILE|OPENSSL_.*|.*_CA_BUNDLE|.*_CA_CERTS?|CURL_.*|GIT_.*|KRB5.*|PG.*|"
    r"LOCALDOMAIN|RES_OPTIONS|NETRC|GRPC_.*|NIX_.*|AWS_ENDPOINT_URL.*|"
    r"ATTUNE.*|NOTIFY_SOCKET|WATCHDOG_.*|CREDENTIALS_DIRECTORY|INVOCATION_ID|JOURNAL_STREAM|DATABASE_URL)$",
    re.IGNORECASE)
# From the daemon's own environment, a child keeps only these (never the database URL, the
# ATTUNE__ overrides, the notify socket or the credentials directory), and the LC_* ones.
INHERITED_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "HOME", "USER", "LOGNAME", "TMPDIR")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SHELL = "/bin/sh"
MQ_EXCHANGE_DEFAULT = "attune.events"  # what the platform's sensor service passes
# The platform's runtime names and aliases (its runtime.aliases), to the interpreter kind.
RUNTIME_KINDS = {"python": "python", "python3": "python", "core.python": "python",
                 "node": "node", "nodejs": "node", "node.js": "node", "core.node": "node",
                 "shell": "shell", "bash": "shell", "sh": "shell", "core.shell": "shell",
                 "native": "native", "builtin": "native", "standalone": "native", "core.native": "native"}


def which(command, path):
    """shutil.which(command, path=path), without importing shutil: shutil loads the bz2 and lzma
    modules for its archives, a visible share of the daemon's memory (docs/performance.md §1)."""
    command, path = os.fspath(command), os.fspath(path)

    def runnable(candidate):
        return os.path.exists(candidate) and os.access(candidate, os.X_OK) and not os.path.isdir(candidate)
    if os.path.dirname(command):
        return command if runnable(command) else None
    seen = set()
    for directory in path.split(os.pathsep):
        if directory not in seen:
            seen.add(directory)
            candidate = os.path.join(directory, command)
            if runnable(candidate):
                return candidate
    return None


class LaunchRefused(Exception):
    """This placement cannot run here; str() is the one-line reason (the sensor is `failed`)."""


def _printable(text):
    return not any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_entrypoint_text(entrypoint):
    """What can be said without the host's file system (also `place`): relative, or absolute,
    never with `..`, one line, bounded. Returns it."""
    if not isinstance(entrypoint, str) or not entrypoint or len(entrypoint) > MAX_ENTRYPOINT:
        raise LaunchRefused(f"an entrypoint is a path of 1-{MAX_ENTRYPOINT} characters")
    if not _printable(entrypoint):
        raise LaunchRefused("the entrypoint contains control characters")
    if ".." in entrypoint.split("/"):
        raise LaunchRefused("the entrypoint may not contain '..'")
    return entrypoint


def _trusted(st, euid):
    """Owned by root or this daemon's user, and writable by nobody else (a sticky root-owned
    directory such as /tmp counts as safe to pass through)."""
    if st.st_uid not in (0, euid):
        return False
    if st.st_mode & 0o022:
        return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX) and st.st_uid == 0
    return True


def resolve_entrypoint(entrypoint, packs_base_dir, euid=None):
    """The real path of the script to run: inside packs_base_dir once every symlink is
    followed, a readable regular file, and neither it nor any directory on its path writable by
    anyone but root or this user."""
    check_entrypoint_text(entrypoint)
    euid = os.geteuid() if euid is None else euid
    base = os.path.realpath(packs_base_dir)
    if not os.path.isdir(base):
        raise LaunchRefused(f"packs_base_dir {packs_base_dir} is not a directory")
    if os.path.isabs(entrypoint):
        normal = os.path.normpath(entrypoint)
        if os.path.commonpath([normal, os.path.normpath(packs_base_dir)]) != os.path.normpath(packs_base_dir) \
                and os.path.commonpath([normal, base]) != base:
            raise LaunchRefused(f"entrypoint {entrypoint} is outside packs_base_dir {packs_base_dir}")
        candidate = normal
    else:
        candidate = os.path.join(base, entrypoint)
    real = os.path.realpath(candidate)
    if real == base or os.path.commonpath([real, base]) != base:
        raise LaunchRefused(f"entrypoint {entrypoint} resolves outside packs_base_dir {packs_base_dir} "
                            "(a symlink out is refused)")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise LaunchRefused(f"entrypoint {entrypoint} does not exist under {packs_base_dir}") from None
    except OSError as exc:
        raise LaunchRefused(f"entrypoint {entrypoint}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LaunchRefused(f"entrypoint {entrypoint} is not a regular file")
    # the file and every directory from / down to it
    path = real
    while True:
        st = os.stat(path)
        if not _trusted(st, euid):
            raise LaunchRefused(f"{path} may be written by other users (owner uid {st.st_uid}, mode "
                                f"{stat.S_IMODE(st.st_mode):o}); a sensor's script and its directories must be "
                                "writable only by root or the daemon's user")
        if path == "/":
            break
        path = os.path.dirname(path)
    if not os.access(real, os.R_OK):
        raise LaunchRefused(f"entrypoint {entrypoint} is not readable by the daemon's user")
    return real


def check_env(env):
    """A placement's extra variables: {name: value}, bounded, none of the forbidden names."""
    if not isinstance(env, dict):
        raise LaunchRefused("env must be a mapping of variable names to values")
    if len(env) > MAX_ENV_ENTRIES:
        raise LaunchRefused(f"env has {len(env)} variables; at most {MAX_ENV_ENTRIES}")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise LaunchRefused(f"env: invalid variable name {key!r:.60}")
        if FORBIDDEN_ENV_RE.fullmatch(key):
            raise LaunchRefused(f"env: {key} may not be set by a placement (it changes what code runs, or is "
                                "the platform's contract)")
        if not isinstance(value, str) or len(value) > MAX_ENV_VALUE or not _printable(value):
            raise LaunchRefused(f"env: {key} must be a string of at most {MAX_ENV_VALUE} characters on one line")
    return dict(env)


def runtime_kind(runtime):
    return RUNTIME_KINDS.get((runtime or "").lower())


def command(runtime, script, interpreters=(), runtimes_exec=None, environ=None):
    """argv for `script` in `runtime`: the operator's sensor.runtimes_exec first, then python
    with the first python interpreter detected, node with node, shell with /bin/sh, native
    executed directly."""
    runtimes_exec = runtimes_exec or {}
    kind = runtime_kind(runtime)
    for name in (runtime, kind):
        if name and name in runtimes_exec:
            return [runtimes_exec[name], script]
    if kind == "native":
        if not os.access(script, os.X_OK):
            raise LaunchRefused(f"{script} is not executable (runtime native runs it directly)")
        return [script]
    if kind == "shell":
        return [SHELL, script]
    if kind in ("python", "node"):
        for interpreter in interpreters:
            if interpreter.get("name") == kind and interpreter.get("path"):
                return [interpreter["path"], script]
        path = (environ or os.environ).get("PATH", DEFAULT_PATH)
        found = which("python3" if kind == "python" else "node", path)
        if found:
            return [found, script]
        raise LaunchRefused(f"no {kind} interpreter found on this host (set sensor.runtimes_exec.{runtime})")
    raise LaunchRefused(f"runtime {runtime!r} has no interpreter here: set sensor.runtimes_exec.{runtime}")


@dataclass(frozen=True)
class Contract:
    """The daemon's side of the platform's standalone-sensor environment."""
    api_url: str = ""
    api_token: str = ""
    mq_url: str = ""
    mq_exchange: str = MQ_EXCHANGE_DEFAULT
    log_level: str = "info"
    poll_interval: float = 30
    inherited: dict = field(default_factory=dict)


def contract_from(config, api_token, environ):
    return Contract(api_url=config.api.url, api_token=api_token, mq_url=config.message_queue.url,
                    mq_exchange=config.message_queue.exchange, log_level=config.log.level,
                    poll_interval=config.sensor.poll_interval,
                    inherited={k: v for k, v in environ.items()
                               if v and (k in INHERITED_ENV or re.fullmatch(r"LC_[A-Z]+", k))})


def environment(contract, sensor_ref, sensor_id=None, triggers="[]", extra=None):
    """The child's environment: a few of the daemon's variables, the placement's own (checked),
    then the platform's contract, which nothing else may override."""
    if not isinstance(triggers, str) or len(triggers) > MAX_TRIGGERS:
        raise LaunchRefused(f"ATTUNE_SENSOR_TRIGGERS must be JSON text of at most {MAX_TRIGGERS} characters")
    env = dict(contract.inherited)
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(check_env(extra or {}))
    poll = contract.poll_interval
    env.update({
        "ATTUNE_SENSOR_REF": sensor_ref,
        "ATTUNE_SENSOR_TRIGGERS": triggers,
        "ATTUNE_API_URL": contract.api_url,
        "ATTUNE_API_TOKEN": contract.api_token,
        "ATTUNE_MQ_URL": contract.mq_url,
        "ATTUNE_MQ_EXCHANGE": contract.mq_exchange,
        "ATTUNE_LOG_LEVEL": contract.log_level,
        "ATTUNE_SENSOR_POLL_INTERVAL": str(int(poll)) if float(poll).is_integer() else str(poll),
    })
    if sensor_id is not None:
        env["ATTUNE_SENSOR_ID"] = str(sensor_id)
    return env


CREDENTIAL_NAME = "attune-api-token"  # the units' LoadCredential= id
MAX_TOKEN_BYTES = 64 * 1024


def api_token(setting, environ):
    """The API token for ATTUNE_API_TOKEN from config api.token_file: "none" (no token), "auto"
    ($CREDENTIALS_DIRECTORY/attune-api-token when systemd passed one, else none) or a path.
    A file that others may read is refused: the token would not be a secret. Never logged."""
    if setting == "none":
        return ""
    if setting == "auto":
        directory = environ.get("CREDENTIALS_DIRECTORY", "")
        path = os.path.join(directory, CREDENTIAL_NAME) if directory else ""
        if not path or not os.path.exists(path):
            return ""
    else:
        path = setting
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LaunchRefused(f"api.token_file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # before reading: a directory, a FIFO or a device is refused unread
        if not stat.S_ISREG(st.st_mode):
            raise LaunchRefused(f"api.token_file {path}: not a regular file")
        if st.st_mode & 0o004:
            raise LaunchRefused(f"api.token_file {path}: readable by every user (mode {stat.S_IMODE(st.st_mode):o}); "
                                "make it chmod 600 or 640, or pass it with LoadCredential=")
        data = os.read(fd, MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise LaunchRefused(f"api.token_file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_BYTES:
        raise LaunchRefused(f"api.token_file {path}: larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise LaunchRefused(f"api.token_file {path}: not UTF-8 text") from None
    if not _printable(token):
        raise LaunchRefused(f"api.token_file {path}: holds control characters (one line expected)")
    return token
