"""The database URL as text: libpq's parse of it, and keeping its password out of every message.

Its own room so that config (validation, `attune-sensor config`) and the error paths of db,
fleet and migrations share one definition of a password, without config depending on the
connection code.
"""

import re

_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@?#]*?:)([^@/?#]*)(@)")
_PARAM_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:\\.|[^'])*'|[^\s&]*)", re.IGNORECASE)
_QUOTED = re.compile(r'"[^"]*"')


def redact_dsn(dsn):
    """The DSN with any password replaced by ***; works for URLs and key=value strings."""
    text = _URL_PASSWORD.sub(r"\1***\3", dsn)
    return _PARAM_PASSWORD.sub(r"\1***", text)


def parse_dsn(dsn):
    """libpq's own parse (no network). ValueError without any fragment of the input."""
    # libpq's parser is the authority on what a URL means; imported on use, so that masking
    # a password alone (describe, the last-resort error line) needs no psycopg2.
    import psycopg2.extensions

    try:
        return psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        # libpq quotes the offending fragment, which may be part of a password.
        reason = _QUOTED.sub('"..."', str(exc).strip().splitlines()[0])
        raise ValueError(reason) from None


def _password(dsn):
    try:
        return parse_dsn(dsn).get("password") or ""
    except ValueError:
        return ""


def scrub(message, dsn):
    """An error text with the DSN's password removed, whatever form it took."""
    secret = _password(dsn)
    text = redact_dsn(str(message))
    if secret:
        text = text.replace(secret, "***")
    return " ".join(text.split())  # one line
