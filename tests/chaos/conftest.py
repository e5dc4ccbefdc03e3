"""The chaos suite (issue 20): faults and hostile input against real servers on 127.0.0.1 (the session's
shared engine in-process, or `python -m server.cli serve` subprocesses), each bounded in time.

Each test records its figures (cases, 5xx, latencies, waits, RSS growth) with the `figures` fixture;
with GLM_SERVE_CHAOS_FIGURES=<path> set, the session writes them there as JSON (benchmarks/RESULTS.md
quotes them with that command)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, Any]]:
    yield FIGURES
    path = os.environ.get("GLM_SERVE_CHAOS_FIGURES")
    if path and FIGURES:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout
        meta = {
            "commit": commit.strip(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        }
        Path(path).write_text(json.dumps({**meta, **FIGURES}, indent=2, sort_keys=True) + "\n")
