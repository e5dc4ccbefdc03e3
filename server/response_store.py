"""Stored responses of the Responses API (`store: true`), for GET /v1/responses/{id} and for continuing a
conversation with previous_response_id. SQLite in the state directory; each row belongs to the API key
that created it (its key_id): another key can neither read, continue nor delete it. Bounded: rows older
than max_age_s and each key's rows beyond its newest max_stored are deleted as new ones are saved."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config_schema import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, created REAL NOT NULL,
    response TEXT NOT NULL, conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_key_created ON responses (key_id, created);
"""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as the client got it
    conversation: list[dict[str, Any]]  # chat messages up to and including its output (no instructions)


class ResponseStore:
    def __init__(self, path: Path, max_stored: int, max_age_s: float) -> None:
        self.max_stored = max_stored
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"response store {path}: {exc}") from None

    def save(self, key_id: str, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        now = time.time()
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                (response["id"], key_id, now, json.dumps(response), json.dumps(conversation)),
            )
            self._db.execute("DELETE FROM responses WHERE created < ?", (now - self.max_age_s,))
            self._db.execute(
                "DELETE FROM responses WHERE key_id = ? AND id NOT IN "
                "(SELECT id FROM responses WHERE key_id = ? ORDER BY created DESC LIMIT ?)",
                (key_id, key_id, self.max_stored),
            )

    def get(self, response_id: str, key_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, conversation FROM responses WHERE id = ? AND key_id = ? AND created >= ?",
                (response_id, key_id, time.time() - self.max_age_s),
            ).fetchone()
        return StoredResponse(json.loads(row[0]), json.loads(row[1])) if row else None

    def delete(self, response_id: str, key_id: str) -> bool:
        with self._lock, self._db:
            cursor = self._db.execute(
                "DELETE FROM responses WHERE id = ? AND key_id = ?", (response_id, key_id)
            )
        return cursor.rowcount > 0
