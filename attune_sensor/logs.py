"""Logging set-up: text lines (with journald priority prefixes under systemd) or JSON."""

import logging
import os
import sys

LOGGER_NAME = "attune_sensor"

# sd-daemon(3) priority prefixes: journald reads them from stderr and strips them.
_PRIORITY = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>", logging.ERROR: "<3>", logging.CRITICAL: "<2>"}


# Characters no log line carries, whoever wrote the text (a sensor ref, another program's row,
# a sensor's own output): C0 and C1 controls but tab and newline (lines are split on it before),
# DEL, and the bidirectional overrides that reorder what an operator reads.
_UNSAFE = {c: "?" for c in list(range(0x09)) + list(range(0x0B, 0x20)) + list(range(0x7F, 0xA0))
           + list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A)) + [0x200E, 0x200F, 0x061C]}


def without_controls(text):
    """`text` with each character a log line may not carry replaced by '?'."""
    return text.translate(_UNSAFE)


class JournalPriority(logging.Formatter):
    """Wraps a formatter: one line per event, prefixed with its journald priority under systemd
    (journald strips the prefix, so a JSON message stays pure JSON in the journal)."""

    def __init__(self, inner, journal):
        super().__init__()
        self.inner = inner
        self.journal = journal

    def format(self, record):
        text = without_controls(" ".join(self.inner.format(record).split("\n")))
        return _PRIORITY.get(record.levelno, "<6>") + text if self.journal else text


def _text_formatter(journal):
    # The journal stamps time and unit itself; elsewhere a timestamp helps.
    return logging.Formatter("%(levelname)s %(message)s" if journal else "%(asctime)s %(levelname)s %(message)s")


def _json_formatter():
    try:  # python-json-logger >= 3 (PyPI)
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:  # 2.0.x, as Debian bookworm ships it
        from pythonjsonlogger.jsonlogger import JsonFormatter
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def setup(level="info", fmt="text", stream=None, environ=None):
    environ = os.environ if environ is None else environ
    journal = bool(environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(stream or sys.stderr)
    inner = _json_formatter() if fmt == "json" else _text_formatter(journal)
    handler.setFormatter(JournalPriority(inner, journal))
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    set_level(level)
    logger.propagate = False
    return logger


def get(name):
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def set_level(level):
    logging.getLogger(LOGGER_NAME).setLevel(level.upper())
