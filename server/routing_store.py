"""The routing state, in the state database beside the usage ledger (usage.path): comparison rows (one
per shadow pair, one per canary request), rollback events, and the weights set at runtime (they outlive
a restart and win over the profile's). The tables are migration 3 of server/usage_schema.py: one file,
one schema version, one migration runner."""

from __future__ import annotations

import threading
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from server.usage_schema import open_state_db

ROUTING_TABLES_SINCE = 3  # the state database's schema version that added the tables below


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


class RoutingStore:
    """One connection (autocommit) behind a lock; the service calls it from worker threads
    (asyncio.to_thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_state_db(path, "routing store")
        self._db.isolation_level = None
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
