"""Logging set-up: text lines (with journald priority prefixes under systemd) or JSON."""

import logging
import os
import sys

LOGGER_NAME = "attune_sensor"

# sd-daemon(3) priority prefixes: journald reads them from stderr and strips them.
_PRIORITY = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>", logging.ERROR: "<3>", logging.CRITICAL: "<2>"}


class JournalTextFormatter(logging.Formatter):
    def __init__(self, journal):
        # The journal stamps time and unit itself; elsewhere a timestamp helps.
        fmt = "%(levelname)s %(message)s" if journal else "%(asctime)s %(levelname)s %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record):
        text = " ".join(super().format(record).split("\n"))  # one event, one line
        if self.journal:
            text = _PRIORITY.get(record.levelno, "<6>") + text
        return text


def _json_formatter():
    try:  # python-json-logger >= 3 (PyPI)
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:  # 2.0.x, as Debian bookworm ships it
        from pythonjsonlogger.jsonlogger import JsonFormatter
    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def setup(level="info", fmt="text", stream=None, environ=None):
    environ = os.environ if environ is None else environ
    stream = stream or sys.stderr
    journal = bool(environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_json_formatter() if fmt == "json" else JournalTextFormatter(journal))
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
