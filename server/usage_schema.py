"""The state database's schema, versioned with SQLite's `PRAGMA user_version`: the usage ledger and the
routing tables (comparisons, rollback events, runtime weights) live in one file, at usage.path.

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

from server.config_schema import ConfigError


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
    Migration(
        3,
        "routing (server/routing_store.py): one comparison row per shadow pair or canary request, rollback "
        "events, and the canary weights set at runtime",
        (
            "CREATE TABLE comparisons (id INTEGER PRIMARY KEY, ts REAL, kind TEXT, model TEXT, endpoint TEXT, "
            "request_id TEXT, key_id TEXT, primary_target TEXT, candidate_target TEXT, served TEXT, "
            "prompt_tokens INTEGER, primary_status INTEGER, candidate_status INTEGER, primary_ttft_s REAL, "
            "candidate_ttft_s REAL, primary_latency_s REAL, candidate_latency_s REAL, primary_tokens INTEGER, "
            "candidate_tokens INTEGER, primary_finish TEXT, candidate_finish TEXT, candidate_error TEXT, "
            "tool_call_agreement INTEGER, primary_json_valid INTEGER, candidate_json_valid INTEGER, "
            "similarity REAL, prompt TEXT, primary_text TEXT, candidate_text TEXT)",
            "CREATE INDEX comparisons_ts ON comparisons (ts)",
            "CREATE TABLE rollbacks (id INTEGER PRIMARY KEY, ts REAL, model TEXT, target TEXT, guard TEXT, "
            "detail TEXT, weight_before REAL)",
            "CREATE TABLE weights (model TEXT PRIMARY KEY, weight REAL, updated_at REAL, source TEXT)",
        ),
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


def open_state_db(path: Path, what: str) -> sqlite3.Connection:
    """A connection to the state database at `path`, created or migrated to SCHEMA_VERSION; `what` names
    its user (the usage ledger, the routing store) in the ConfigError for a file it cannot use."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        migrate(db, path)
    except SchemaTooNew as exc:
        raise ConfigError(f"{what}: {exc}") from None
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    return db
