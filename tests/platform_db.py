"""Attune-flavour databases for the tests, from two sources:

* "fixture": tests/attune_flavour.sql, the project's own SQL written from the platform's facts,
  always available;
* "platform": the Attune platform's real migrations in ../shared/attune-schema (never copied
  into the project). Where that folder is absent the tests that need it are skipped with the
  reason, unless ATTUNE_SENSOR_REQUIRE_PLATFORM_SCHEMA=1 (CI sets it) makes them fail.
"""

import os
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_SQL = Path(__file__).with_name("attune_flavour.sql")
PLATFORM_SCHEMA_DIR = Path(os.environ.get("ATTUNE_SCHEMA_DIR") or ROOT.parent / "shared" / "attune-schema")
REQUIRE_PLATFORM = os.environ.get("ATTUNE_SENSOR_REQUIRE_PLATFORM_SCHEMA") == "1"


def platform_migrations():
    """The platform's migration files in the order it applies them (by name)."""
    return sorted(PLATFORM_SCHEMA_DIR.glob("*.sql"))


def platform_missing_reason():
    if not platform_migrations():
        return f"the Attune platform's migrations are not at {PLATFORM_SCHEMA_DIR} (set ATTUNE_SCHEMA_DIR)"
    return None


def build(url, source):
    """Builds the Attune schema in the (empty) database at `url`, as its owner, the way the
    platform does: each file with search_path attune, public."""
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            if source == "fixture":
                cursor.execute(FIXTURE_SQL.read_text())
                return
            for path in platform_migrations():
                cursor.execute("SET search_path TO attune, public")
                cursor.execute(path.read_text())
    finally:
        conn.close()
