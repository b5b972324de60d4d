"""A database password never reaches any output, in any form libpq accepts: percent-encoded or
raw in a URL (where an unencoded @ or / makes libpq split it elsewhere than its writer did), in a
URL's query, quoted or backslash-escaped in a key=value string. The masked form stays readable."""

import re
from urllib.parse import quote

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from attune_sensor.config.dsn import parse_dsn, redact_dsn, scrub
from support import run_cli, write_config

HOST, PORT, USER, DB = "127.0.0.1", "5432", "alice", "attune"

# URL and DSN punctuation, quotes, spaces, backslashes, and any other character but NUL
# (which libpq refuses in every form) and lone surrogates (not text)
PASSWORDS = st.text(
    alphabet=st.one_of(st.sampled_from("#?@/:%= '\"\\&,;[]+~\t"),
                       st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
    min_size=4, max_size=24)


def _quoted(password):
    return "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _escaped(password):
    escaped = re.sub(r"([ \t\n\r\f\v\\])", r"\\\1", password)
    return "\\" + escaped if escaped.startswith("'") else escaped


FORMS = {
    "url-encoded": lambda pw: f"postgresql://{USER}:{quote(pw, safe='')}@{HOST}:{PORT}/{DB}",
    "url-raw": lambda pw: f"postgresql://{USER}:{pw}@{HOST}:{PORT}/{DB}",
    "postgres-raw-no-port": lambda pw: f"postgres://{USER}:{pw}@{HOST}/{DB}",
    "query-encoded": lambda pw: f"postgresql://{USER}@{HOST}:{PORT}/{DB}?password={quote(pw, safe='')}",
    # raw in a query, libpq's & separates parameters: the password is what comes before one
    "query-raw": lambda pw: f"postgresql://{USER}@{HOST}:{PORT}/{DB}?sslmode=disable&password={pw}",
    "sslpassword-query": lambda pw: f"postgresql://{USER}@{HOST}/{DB}?sslpassword={quote(pw, safe='')}",
    "dsn-quoted": lambda pw: f"host={HOST} port={PORT} user={USER} password = {_quoted(pw)} dbname={DB}",
    "dsn-escaped": lambda pw: f"host={HOST} port={PORT} password={_escaped(pw)} user={USER} dbname={DB}",
    "dsn-last": lambda pw: f"host={HOST} user={USER} dbname={DB} password={_quoted(pw)}",
}

MESSAGES = ('could not translate host name "{}" to address: Name or service not known',
            'connection to server at "{}", port 1 failed: Connection refused',
            'FATAL:  database "{}" does not exist', 'FATAL:  password authentication failed for user "{}"',
            'invalid port number: "{}"')


def _pieces(password):
    """The password, and each stretch of it between URL and DSN punctuation, at least 4 long."""
    return {password} | {p for p in re.split(r"[@/?#:&=,\s'\"\\]", password) if len(p) >= 4}


def _error_text(dsn, parsed, password):
    """What an error might quote: every value libpq read (each element of a host or port list),
    the DSN itself, the password as written, encoded and as libpq read it."""
    values = set(parsed.values())
    values |= {part for key in ("host", "hostaddr", "port") for part in parsed.get(key, "").split(",")}
    quoted = [template.format(value) for template in MESSAGES for value in sorted(values)]
    return "\n".join(quoted + [dsn, password, quote(password, safe=""), f"invalid dsn: {dsn}"])


@settings(max_examples=400, deadline=None)
@given(password=PASSWORDS, form=st.sampled_from(sorted(FORMS)))
@example(password="pa#ss", form="url-raw")
@example(password="pa?ss", form="url-raw")
@example(password="p@ss", form="url-raw")
@example(password="p@ss", form="postgres-raw-no-port")
@example(password="1234/abcd", form="url-raw")
@example(password="p@abcd,efgh", form="url-raw")
@example(password="ab?password=cd&x", form="url-raw")
@example(password="pa ss\\'x", form="dsn-quoted")
@example(password="'pa ss", form="dsn-escaped")
@example(password="pa\u00a0ss", form="dsn-escaped")
def test_property_no_piece_of_a_password_survives_masking_or_scrubbing(password, form):
    if form == "query-raw":
        assume("&" not in password)
    dsn = FORMS[form](password)
    benign = FORMS[form]("") + "".join(MESSAGES) + "invalid dsn: *** x"
    pieces = _pieces(password)
    assume(not any(piece in benign for piece in pieces))
    try:
        parsed = parse_dsn(dsn)
    except ValueError as exc:  # libpq refuses it: the refusal names no piece of it
        assert not any(piece in str(exc) for piece in pieces), (dsn, str(exc))
        return

    masked = redact_dsn(dsn)
    assert not any(piece in masked for piece in pieces), (dsn, masked)
    # still recognisable: the scheme or the keys, and the mask where the password was
    if form.startswith(("url", "postgres")):
        assert masked.startswith(dsn.split("://")[0] + f"://{USER}:***@"), masked
    elif form.startswith(("query", "sslpassword")):
        # an @ after the host's colon may end a raw password there: masked from that colon on
        assert masked.startswith(f"postgresql://{USER}@{HOST}") and masked.endswith("***"), masked
    else:
        assert f"host={HOST}" in masked and re.search(r"password ?= ?\*\*\*", masked), masked

    scrubbed = scrub(_error_text(dsn, parsed, password), dsn)
    assert not any(piece in scrubbed for piece in pieces), (dsn, parsed, scrubbed)
    assert "\n" not in scrubbed
    if parsed.get("password", parsed.get("sslpassword")) == password and password.isprintable():
        # what libpq read whole is masked whole; a piece it read as a password of its own (or
        # a value with a blank in it) may be short and mask letters elsewhere too
        assert "to address: Name or service not known" in scrubbed, scrubbed


def test_the_reviewed_leaks_are_masked():
    assert redact_dsn("postgresql://u:pa#ss@h/db") == "postgresql://u:***@h/db"
    assert redact_dsn("postgresql://u:pa?ss@h/db") == "postgresql://u:***@h/db"
    assert redact_dsn("postgresql://u:p@ss@127.0.0.1/db") == "postgresql://u:***@127.0.0.1/db"
    # libpq read the host "ss@127.0.0.1": an error naming that host names a piece of the password
    error = 'could not translate host name "ss@127.0.0.1" to address: Name or service not known'
    assert scrub(error, "postgresql://u:p@ss@127.0.0.1/db") == \
        'could not translate host name "***" to address: Name or service not known'
    # keys as libpq reads them: percent-decoded in a query; sslpassword is a secret too
    assert redact_dsn("postgresql://u@h/db?pass%77ord=s3cret") == "postgresql://u@h/db?pass%77ord=***"
    assert redact_dsn("host=h sslpassword='a b' user=u") == "host=h sslpassword=*** user=u"


def test_the_config_command_and_a_failed_connection_show_no_piece_of_a_raw_password(tmp_path):
    for password in ("pa#ss-word", "pa?ss-word", "pass@word-1"):
        url = f"postgresql://nobody:{password}@127.0.0.1:1/none"
        path = write_config(tmp_path, {"database": {"url": url, "connect_timeout": 2}})
        shown = run_cli("--config", path, "config")
        assert shown.returncode == 0, shown.stderr
        assert "postgresql://nobody:***@127.0.0.1:1/none" in shown.stdout
        failed = run_cli("--config", path, "workers")
        assert failed.returncode == 69, failed.stderr
        for piece in _pieces(password) | {"word"}:
            assert piece not in shown.stdout + shown.stderr + failed.stdout + failed.stderr, piece


@given(st.text(alphabet=st.one_of(st.sampled_from("%0123456789abcdefABCDEFgz"),
                                  st.characters(blacklist_categories=("Cs",)))))
@settings(max_examples=400, deadline=None)
@example("%e2%82%ac %E2%82 %zz %% %4 100%")
@example("%ff%fe%00")
def test_the_percent_coding_stands_in_for_urllib_parse(text):
    """dsn.quote and dsn.unquote stand in for urllib.parse's (whose import loads ipaddress into
    the daemon): the same text from any input, malformed escapes and broken UTF-8 included."""
    from urllib.parse import unquote as urllib_unquote

    from attune_sensor.config import dsn

    assert dsn.quote(text) == quote(text, safe="")
    assert dsn.unquote(text) == urllib_unquote(text)
    assert dsn.unquote(dsn.quote(text)) == text


def test_jitter_is_uniform_in_the_unit_interval():
    """db.fraction stands in for random.random (whose import costs start-up): in [0, 1), spread."""
    from attune_sensor.db import fraction

    draws = [fraction() for _ in range(4000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert [sum(1 for d in draws if k / 4 <= d < (k + 1) / 4) > 800 for k in range(4)] == [True] * 4
