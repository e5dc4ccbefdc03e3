"""Schema versions of the state database (server/usage_schema.py): a ledger written by the previous
release opens and migrates with its rows intact, a ledger from a newer release is refused with a message
that says so, and the migrated schema is the one the row dataclass writes."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import fields
from pathlib import Path

import pytest

from server.cli import main as cli_main
from server.config import ConfigError
from server.usage import UsageConfig, UsageLedger, UsageRow
from server.usage_report import build_report
from server.usage_schema import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version

# What glm-serve wrote before schema versioning (user_version 0), verbatim: the `usage` table of
# schema version 1 as server/usage.py created it, and one row as it inserted it.
RELEASED_V1 = """
CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY, ts REAL, request_id TEXT, key_id TEXT, model TEXT,
backend TEXT, endpoint TEXT, status INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER,
tokens_exact INTEGER, finish_reason TEXT, stream INTEGER, upstream_model TEXT, overflow_reason TEXT,
ttft_s REAL, latency_s REAL, gpu_seconds REAL, cost_usd REAL, official_usd REAL, holysheep_usd REAL);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
INSERT INTO usage (ts, request_id, key_id, model, backend, endpoint, status, prompt_tokens, completion_tokens,
tokens_exact, finish_reason, stream, upstream_model, overflow_reason, ttft_s, latency_s, gpu_seconds, cost_usd,
official_usd, holysheep_usd) VALUES (1700000000.0, 'chatcmpl-old', 'anonymous', 'glm-5', 'local',
'/v1/chat/completions', 200, 12, 7, 1, 'stop', 0, NULL, NULL, 0.05, 0.4, 0.4, NULL, NULL, 0.0000140);
"""


def columns(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [r[1] for r in db.execute("PRAGMA table_info(usage)")]


def version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return schema_version(db)


def released_v1_ledger(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.executescript(RELEASED_V1)
    assert version(path) == 0
    return path


def test_migrations_are_numbered_one_by_one():
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 2


def test_a_new_ledger_has_the_latest_schema_and_every_row_field(tmp_path):
    path = tmp_path / "ledger.sqlite"
    UsageLedger(path).close()
    assert version(path) == SCHEMA_VERSION
    assert columns(path) == ["id", *(f.name for f in fields(UsageRow))]


def test_a_ledger_of_the_previous_release_opens_and_migrates(tmp_path):
    path = released_v1_ledger(tmp_path / "ledger.sqlite")
    ledger = UsageLedger(path)
    ledger.submit(UsageRow(ts=time.time(), request_id="cmpl-new", key_id="k", model="glm-5", backend="local",
                           endpoint="/v1/completions", status=200, api="completions"))  # fmt: skip
    ledger.close()
    assert version(path) == SCHEMA_VERSION and "api" in columns(path)
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT request_id, api, prompt_tokens, holysheep_usd FROM usage ORDER BY id"
        ).fetchall()
    assert rows == [("chatcmpl-old", None, 12, 0.000014), ("cmpl-new", "completions", 0, None)]
    report = build_report(path, UsageConfig(), by="model")  # the report reads old and new rows alike
    assert report["totals"]["requests"] == 2 and report["totals"]["prompt_tokens"] == 12
    UsageLedger(path).close()  # opening a current ledger again changes nothing
    assert version(path) == SCHEMA_VERSION


def test_migration_steps_are_atomic(tmp_path):
    path = released_v1_ledger(tmp_path / "ledger.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE usage ADD COLUMN api TEXT")  # makes migration 2 fail half-way
        db.execute("PRAGMA user_version = 1")
    with sqlite3.connect(path) as db, pytest.raises(sqlite3.OperationalError, match="duplicate column"):
        migrate(db, path)
    assert version(path) == 1  # the failed step left the version where it was


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    UsageLedger(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, newer than") as caught:
        UsageLedger(path)
    assert "upgrade glm-serve" in str(caught.value) and str(path) in str(caught.value)
    assert version(path) == SCHEMA_VERSION + 1  # refused, not touched
    assert cli_main(["usage", "report", "--db", str(path)]) == 2
    err = capsys.readouterr().err
    assert "newer than" in err and "Traceback" not in err
