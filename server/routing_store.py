"""The routing state in SQLite, in the state directory beside the usage ledger: comparison rows (one per
shadow pair, one per canary request), rollback events, and the weights set at runtime (they outlive a
restart and win over the profile's).

The schema is versioned with `PRAGMA user_version` the way the usage ledger's is: MIGRATIONS is the
whole history, each applied once in its own transaction; a newer file is refused."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from server.config import ConfigError
from server.usage import state_dir

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: comparisons, rollback events, runtime weights
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
)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(slots=True)
class ComparisonRow:
    """kind shadow: both sides filled. kind canary: only the side that served (`served`)."""

    ts: float
    kind: str  # shadow | canary
    model: str
    endpoint: str
    request_id: str
    key_id: str  # the API key's sha256 id, never the key
    primary_target: str
    candidate_target: str
    served: str  # primary | candidate
    prompt_tokens: int | None = None
    primary_status: int | None = None
    candidate_status: int | None = None
    primary_ttft_s: float | None = None
    candidate_ttft_s: float | None = None
    primary_latency_s: float | None = None
    candidate_latency_s: float | None = None
    primary_tokens: int | None = None
    candidate_tokens: int | None = None
    primary_finish: str | None = None
    candidate_finish: str | None = None
    candidate_error: str | None = None
    tool_call_agreement: bool | None = None
    primary_json_valid: bool | None = None
    candidate_json_valid: bool | None = None
    similarity: float | None = None
    prompt: str | None = None  # these three only with routing.store_text
    primary_text: str | None = None
    candidate_text: str | None = None


COLUMNS = [f.name for f in fields(ComparisonRow)]
INSERT = f"INSERT INTO comparisons ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def store_path(configured: str) -> Path:
    """routing.path; a relative one is under the state directory, where the usage ledger is."""
    path = Path(configured).expanduser()
    return path if path.is_absolute() else state_dir() / path


def migrate(db: sqlite3.Connection, path: Path) -> None:
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise ConfigError(
            f"{path} has routing schema version {found}, newer than the {SCHEMA_VERSION} this glm-serve knows"
        )
    for version, statements in enumerate(MIGRATIONS[found:], found + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            if int(db.execute("PRAGMA user_version").fetchone()[0]) < version:
                for statement in statements:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version}")
            db.commit()
        except BaseException:
            db.rollback()
            raise


def open_db(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        migrate(db, path)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"routing store {path}: {exc}") from None
    return db


class RoutingStore:
    """One connection behind a lock; the service calls it from worker threads (asyncio.to_thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_db(path)
        self._lock = threading.Lock()

    def add_comparison(self, row: ComparisonRow) -> None:
        with self._lock:
            self._db.execute(INSERT, astuple(row))

    def add_rollback(self, model: str, target: str, guard: str, detail: str, weight_before: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO rollbacks (ts, model, target, guard, detail, weight_before) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), model, target, guard, detail, weight_before),
            )

    def set_weight(self, model: str, weight: float, source: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO weights (model, weight, updated_at, source) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(model) DO UPDATE SET weight = excluded.weight, updated_at = excluded.updated_at, "
                "source = excluded.source",
                (model, weight, time.time(), source),
            )

    def weights(self) -> dict[str, float]:
        with self._lock:
            return {m: float(w) for m, w in self._db.execute("SELECT model, weight FROM weights")}

    def close(self) -> None:
        with self._lock:
            self._db.close()
