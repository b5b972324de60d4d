"""The database URL as text: libpq's parse of it, and keeping its password out of every message.

Its own room so that config (validation, `attune-sensor config`) and the error paths of db,
fleet and migrations share one definition of a password, without config depending on the
connection code.

What counts as the password is decided the safe way round (docs/design.md, "Configuration
errors and secrets"): libpq reads `postgresql://u:p@ss@host` as password `p` on host `ss@host`,
its writer meant `p@ss`. The mask covers every reading: in a URL, from the first `:` after `//`
to the last `@`; every value of a `password` or `sslpassword` key, in a query (keys
percent-decoded, as libpq does) or a key=value string (tokenised as libpq's conninfo_parse
does). Too much masked is a cosmetic flaw, too little is a leak.
"""

import re

# Percent-encoding as urllib.parse's quote(text, safe="") and unquote do it, here because importing
# urllib.parse (which loads ipaddress) is a visible share of the daemon's start-up
# (docs/performance.md, section 1); tests hold the two to the same answers.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_PERCENT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def quote(text):
    """urllib.parse.quote(text, safe="")."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in text.encode("utf-8"))


def unquote(text):
    """urllib.parse.unquote(text): runs of %XX decoded as UTF-8, undecodable bytes replaced."""
    if "%" not in text:
        return text
    return _PERCENT_RUN.sub(lambda m: bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8", "replace"), text)

SECRET_KEYS = ("password", "sslpassword")
MASK = "***"

_URL_START = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
# best effort for text that is not one DSN (an error message): any `password = value`
_PARAM = re.compile(r"(?<![A-Za-z0-9_])(?:ssl)?password[ \t\n\r\f\v]*=[ \t\n\r\f\v]*"
                    r"('(?:\\.|[^'\\])*'?|(?:\\.|[^ \t\n\r\f\v\\])*\\?)", re.IGNORECASE | re.DOTALL)
_QUOTED = re.compile(r'"(?:.*"|[^"]*$)', re.DOTALL)
_C_SPACE = " \t\n\r\f\v"  # libpq's isspace(); a no-break space is part of a value


def redact_dsn(dsn):
    """The DSN with any password replaced by ***; works for URLs and key=value strings, and
    for a message that quotes one (best effort there: the message has no known end)."""
    dsn = str(dsn)
    return _apply(dsn, _secret_spans(dsn))


def parse_dsn(dsn):
    """libpq's own parse (no network). ValueError without any fragment of the input."""
    # libpq's parser is the authority on what a URL means; imported on use, so that masking
    # a password alone (describe, the last-resort error line) needs no psycopg2.
    import psycopg2.extensions

    try:
        return psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        # libpq quotes the offending fragment, which may be part of a password (and hold a
        # quote or a line break itself): everything from the first quote to the last goes.
        reason = _QUOTED.sub('"..."', str(exc))
        raise ValueError(" ".join(reason.split())) from None


def scrub(message, dsn):
    """An error text with the DSN's password removed, whatever form it took: as libpq read
    it, as it was written (raw or percent-encoded), and any host, port or database name libpq
    made of a piece of it (an unencoded @ or / in the password)."""
    secrets = _secrets(str(dsn))
    text = _apply(str(message), _occurrences(str(message), secrets))
    text = " ".join(text.split())  # one line
    text = _apply(text, _occurrences(text, {" ".join(s.split()) for s in secrets}))
    return redact_dsn(text)


# -- where the secrets are ------------------------------------------------------------------

def _secret_spans(text):
    """(start, end) of every stretch of `text` that is or may be a password."""
    spans = []
    for start in _URL_START.finditer(text):
        spans += _url_spans(text, start.end())
    keyvalue = None if _URL_START.match(text.lstrip(_C_SPACE)) else _conninfo(text)
    if keyvalue is not None:
        spans += [span for key, span, _value in keyvalue if key.lower() in SECRET_KEYS]
    spans += [match.span(1) for match in _PARAM.finditer(text)]
    return [(a, b) for a, b in spans if b > a]


def _url_spans(text, rest):
    """A URL starting (after `scheme://`) at `rest` and running to the end of `text`."""
    spans = []
    last_at = text.rfind("@", rest)
    colon = text.find(":", rest)
    if 0 <= colon < last_at:
        spans.append((colon + 1, last_at))  # user:<password>@, to the last @ whatever came between
    # any ?key= or &key= whose key decodes to a secret one, to the next & (libpq splits there)
    for match in re.finditer(r"[?&]([^=&]*)=", text[rest:]):
        if unquote(match.group(1)).lower() in SECRET_KEYS:
            value = rest + match.end()
            end = text.find("&", value)
            spans.append((value, len(text) if end < 0 else end))
    return spans


def _conninfo(text):
    """libpq's conninfo_parse on a key=value string: [(key, (start, end) of the value as written,
    the value)], or None where libpq would refuse it."""
    result, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in _C_SPACE:
            i += 1
        if i >= n:
            return result
        key_start = i
        while i < n and text[i] not in _C_SPACE and text[i] != "=":
            i += 1
        key = text[key_start:i]
        while i < n and text[i] in _C_SPACE:
            i += 1
        if i >= n or text[i] != "=":
            return None
        i += 1
        while i < n and text[i] in _C_SPACE:
            i += 1
        start, value = i, []
        if i < n and text[i] == "'":
            i += 1
            while i < n and text[i] != "'":
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
            if i >= n:
                return None
            i += 1
        else:
            while i < n and text[i] not in _C_SPACE:
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
        result.append((key, (start, i), "".join(value)))


def _secrets(dsn):
    """Every string that is, or was made of, a piece of the DSN's password."""
    found = set()
    for start, end in _secret_spans(dsn):
        raw = dsn[start:end]
        found |= {raw, unquote(raw), raw.strip("'"), unquote(raw.strip("'"))}
    url = _URL_START.match(dsn.strip(_C_SPACE))
    if not url:  # a key=value value as libpq reads it: quotes and backslashes gone
        found |= {value for key, _span, value in _conninfo(dsn) or [] if key.lower() in SECRET_KEYS}
    parsed = _libpq(dsn)
    found |= {parsed.get(key, "") for key in SECRET_KEYS}
    if url and parsed:
        found |= _misread(dsn.strip(_C_SPACE), parsed)
    found |= {quote(secret) for secret in found}  # as a URL would carry it
    return {secret for secret in found if secret}


def _misread(url, parsed):
    """The values libpq took from a piece of the password: with an unencoded @ or / in it,
    libpq splits the URL elsewhere than its writer did. Those values are whatever libpq read
    that it would not read once the password (as we delimit it) is left out."""
    rest = _URL_START.match(url).end()
    last_at = url.rfind("@", rest)
    userinfo = url[rest:last_at] if last_at >= 0 else ""
    if "@" not in userinfo and "/" not in userinfo:
        return set()  # libpq's userinfo is ours: nothing was misread
    spans = _url_spans(url, rest)
    intended = _libpq(_apply(url, spans, "x"))  # {} when refused: every value may hold a piece
    # libpq names one host or port of a list at a time: each element counts on its own
    misread = {value for value in parsed.values() if value not in intended.values()}
    return misread | {part for value in misread for part in value.split(",")}


def _libpq(dsn):
    try:
        return parse_dsn(dsn)
    except Exception:  # refused, or no psycopg2: the spans alone
        return {}


# -- replacing ------------------------------------------------------------------------------

def _occurrences(text, secrets):
    spans = []
    for secret in filter(None, secrets):
        start = text.find(secret)
        while start >= 0:
            spans.append((start, start + len(secret)))
            start = text.find(secret, start + 1)
    return spans


def _apply(text, spans, mask=MASK):
    """`text` with the union of `spans` each replaced by `mask` (overlaps merged first, so one
    secret's mask cannot leave a piece of another that overlapped it)."""
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, last = [], 0
    for start, end in merged:
        out += [text[last:start], mask]
        last = end
    return "".join(out + [text[last:]])
