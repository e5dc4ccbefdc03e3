"""The state database's schema, versioned with SQLite's `PRAGMA user_version`.

MIGRATIONS is the whole history: migration N takes a database at version N-1 to version N, and
SCHEMA_VERSION is the last one. migrate() runs the missing ones at open, each in its own transaction
with the version bump, so a newer glm-serve upgrades an older ledger in place and an older glm-serve
refuses a newer ledger (SchemaTooNew) instead of writing rows it does not understand.

To change the schema: append one Migration (its statements must work on the previous version, and must
not be edited once released), then add the matching field to the row dataclass that writes it.
Ledgers written before versioning have user_version 0 and the version-1 table, so migration 1 is
`CREATE ... IF NOT EXISTS` and is a no-op for them."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    what: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "usage rows: one per generation request",
        (
            "CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY, ts REAL, request_id TEXT, key_id TEXT, "
            "model TEXT, backend TEXT, endpoint TEXT, status INTEGER, prompt_tokens INTEGER, "
            "completion_tokens INTEGER, tokens_exact INTEGER, finish_reason TEXT, stream INTEGER, "
            "upstream_model TEXT, overflow_reason TEXT, ttft_s REAL, latency_s REAL, gpu_seconds REAL, "
            "cost_usd REAL, official_usd REAL, holysheep_usd REAL)",
            "CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts)",
        ),
    ),
    Migration(
        2,
        "usage.api: which API the request came through (chat | completions | messages | responses)",
        ("ALTER TABLE usage ADD COLUMN api TEXT",),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class SchemaTooNew(Exception):
    """The database was written by a newer glm-serve."""


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def check_not_newer(db: sqlite3.Connection, path: Path) -> int:
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{path} has schema version {version}, newer than the {SCHEMA_VERSION} this glm-serve knows: "
            "it was written by a newer glm-serve; upgrade glm-serve, or point usage.path at another file"
        )
    return version


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring `db` to SCHEMA_VERSION; returns the version it had. Each step holds the write lock
    (BEGIN IMMEDIATE) and re-reads the version, so two processes opening one file migrate it once."""
    found = check_not_newer(db, path)
    for migration in MIGRATIONS[found:]:
        db.execute("BEGIN IMMEDIATE")
        try:
            if check_not_newer(db, path) < migration.version:
                for statement in migration.statements:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {migration.version}")
            db.commit()
        except BaseException:
            db.rollback()
            raise
    return found
