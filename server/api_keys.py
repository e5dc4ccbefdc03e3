"""API keys as the server sees them: an id (never the key itself) and roles. Collected from the profile by
server/config.py: collect_api_keys; checked per request by server/app.py: ApiKeyCheck."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

KEY_ROLES = ("sovereign", "force_overflow", "admin")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What a presented key may do. key_id is the key's sha256 (16 hex digits): the ledger and logs see
    only that, never the key."""

    key_id: str
    sovereign: bool = False
    force_overflow: bool = False
    admin: bool = False


ANONYMOUS_KEY = ApiKey(key_id="anonymous")  # no API keys configured


def api_key_id(raw: str | bytes) -> str:
    return hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()[:16]
