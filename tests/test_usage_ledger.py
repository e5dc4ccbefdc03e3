"""The usage ledger without a server: the `usage:` section and price table, rows from access fields,
the SQLite writer (batches, flush, close, a crash after commit), and the report and its CLI."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from server.api_keys import api_key_id
from server.cli import main as cli_main
from server.config import CONFIG_DIR, ConfigError, load_config
from server.request_record import RequestRecord
from server.usage import (
    DEFAULT_PRICES,
    PRICES_AS_OF,
    Price,
    UsageConfig,
    UsageLedger,
    UsageRecorder,
    UsageRow,
    parse_usage_config,
)
from server.usage_report import build_report, parse_since, render

REPO = Path(__file__).resolve().parent.parent


# -- configuration ------------------------------------------------------------------------------------------
def test_default_prices_are_holysheeps_published_ones():
    assert PRICES_AS_OF.startswith("2026")
    assert DEFAULT_PRICES["glm-5"]["holysheep"] == Price(0.35, 1.40)
    assert DEFAULT_PRICES["deepseek-v3.2"] == {"holysheep": Price(0.27, 1.08), "official": Price(0.42, 0.42)}
    averages = {"gpt-4.1": (1.20, 8.00), "claude-sonnet-4.5": (2.25, 15.00), "gemini-2.5-flash": (0.38, 2.50)}
    for model, (ours, official) in averages.items():
        assert DEFAULT_PRICES[model] == {
            "holysheep": Price(ours, ours),
            "official": Price(official, official),
        }
    cfg = parse_usage_config(load_config("cpu").extra["usage"])
    assert cfg.enabled and cfg.prices == DEFAULT_PRICES and cfg.gpu_hour_usd is None
    assert cfg.price("holysheep", "GLM_5") == Price(0.35, 1.40)  # one model, however it is spelled
    assert cfg.price("official", "glm-5", "DeepSeek-V3.2") == Price(0.42, 0.42)  # first priced name wins


def test_price_overrides_merge_over_the_defaults():
    cfg = parse_usage_config({"prices": {"GLM-5": {"official": {"input": 1, "output": 3.2}}}})
    assert cfg.prices["glm-5"] == {"holysheep": Price(0.35, 1.40), "official": Price(1.0, 3.2)}
    assert cfg.prices["gpt-4.1"] == DEFAULT_PRICES["gpt-4.1"]


@pytest.mark.parametrize(
    ("section", "names"),
    [
        ({"pathh": "x"}, "usage.pathh"),
        ({"prices": {"glm-5": {"local": {"input": 1, "output": 1}}}}, "usage.prices.glm-5.local"),
        ({"prices": {"glm-5": {"official": {"input": 1}}}}, "usage.prices.glm-5.official"),
        ({"prices": {"glm-5": {"official": {"input": -1, "output": 1}}}}, "usage.prices.glm-5.official"),
        ({"batch_size": 0}, "usage.batch_size"),
        ({"gpu_hour_usd": "cheap"}, "usage.gpu_hour_usd"),
    ],
)
def test_bad_sections_are_errors_naming_the_key(section, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse_usage_config(section)


def test_relative_paths_live_in_the_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GLM_SERVE_STATE_DIR", str(tmp_path))
    assert UsageConfig().resolved_path() == tmp_path / "usage.sqlite"
    assert UsageConfig(path="/srv/ledger.db").resolved_path() == Path("/srv/ledger.db")


# -- the writer ---------------------------------------------------------------------------------------------
def row(i: int, **fields) -> UsageRow:
    base = dict(ts=time.time(), request_id=f"r{i}", key_id="k", model="glm-5", backend="local",
                endpoint="/v1/chat/completions", status=200, prompt_tokens=10, completion_tokens=5)  # fmt: skip
    return UsageRow(**{**base, **fields})


def count(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]


def test_rows_are_committed_in_batches_and_close_flushes(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = UsageLedger(path, batch_size=16)
    ledger.start()
    for i in range(100):
        ledger.submit(row(i))
    assert ledger.flush()
    assert count(path) == 100
    for i in range(100, 150):
        ledger.submit(row(i))
    ledger.close()
    assert count(path) == 150
    ledger.submit(row(150))  # a straggler after shutdown is written at once
    assert count(path) == 151
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        ids = [r[0] for r in db.execute("SELECT request_id FROM usage ORDER BY id")]
    assert ids == [f"r{i}" for i in range(151)]


def test_a_crash_loses_no_committed_row(tmp_path):
    path = tmp_path / "ledger.sqlite"
    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from server.usage import UsageLedger, UsageRow
        ledger = UsageLedger(Path({str(path)!r}))
        ledger.start()
        for i in range(40):
            ledger.submit(UsageRow(ts=time.time(), request_id=str(i), key_id="k", model="m", backend="local",
                                   endpoint="/v1/completions", status=200))
        assert ledger.flush()
        os._exit(9)  # no close, no atexit: as if killed
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()
    assert count(path) == 40


def test_an_unwritable_ledger_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="usage ledger"):
        UsageLedger(blocker / "ledger.sqlite")


# -- rows from requests -------------------------------------------------------------------------------------
class Key:
    key_id = api_key_id("sk-secret")


def recorder(tmp_path: Path, gpu_hour_usd: float | None = 3.6) -> UsageRecorder:
    cfg = parse_usage_config(
        {"gpu_hour_usd": gpu_hour_usd, "prices": {"glm-5": {"official": {"input": 1, "output": 4}}}}
    )
    return UsageRecorder(cfg, UsageLedger(tmp_path / "ledger.sqlite"), devices=8)


def recorded(rec: UsageRecorder) -> list[dict]:
    rec.close()
    with sqlite3.connect(rec.ledger.path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM usage ORDER BY id")]


def test_rows_from_request_records(tmp_path):
    rec = recorder(tmp_path)
    scope = {"path": "/v1/chat/completions", "method": "POST", "state": {"api_key": Key()}}
    local = RequestRecord(id="chatcmpl-1", model="glm-5", served_by="local", prompt_tokens=1000, completion_tokens=500,
                 finish_reasons=["stop"], running_at_admission=3, ttft_s=0.2)  # fmt: skip
    rec.record(scope, 200, 1_700_000_000.0, 10.0, local)
    remote = RequestRecord(id="chatcmpl-2", model="glm-5", served_by="holysheep", upstream_model="glm_5", stream=True,
                  prompt_tokens=1_000_000, completion_tokens=1_000_000, finish_reasons=["length"],
                  overflow_reason="queue", tokens_exact=False)  # fmt: skip
    rec.record(scope, 200, 1_700_000_001.0, 2.0, remote)
    rec.record({**scope, "state": {}}, 401, 1_700_000_002.0, 0.001, RequestRecord(id="req-x"))
    rec.record(
        {"path": "/v1/models", "method": "GET"}, 200, 1_700_000_003.0, 0.001, RequestRecord()
    )  # not metered
    first, second = recorded(rec)  # the 401 left no row
    assert (first["backend"], first["finish_reason"], first["key_id"]) == ("local", "stop", Key.key_id)
    assert first["gpu_seconds"] == pytest.approx(10.0 * 8 / 4)  # latency x devices / (running + 1)
    assert first["cost_usd"] == pytest.approx(20.0 / 3600 * 3.6)
    assert first["official_usd"] == pytest.approx((1000 * 1 + 500 * 4) / 1e6)
    assert first["holysheep_usd"] == pytest.approx((1000 * 0.35 + 500 * 1.40) / 1e6)
    assert second["cost_usd"] == pytest.approx(0.35 + 1.40) and second["gpu_seconds"] is None
    assert (second["upstream_model"], second["overflow_reason"], second["tokens_exact"]) == (
        "glm_5",
        "queue",
        0,
    )
    assert "sk-secret" not in json.dumps([first, second])


# -- the report ---------------------------------------------------------------------------------------------
def write_rows(path: Path, rows: list[UsageRow]) -> None:
    ledger = UsageLedger(path)
    for r in rows:
        ledger.submit(r)
    ledger.close()


def test_report_sums_the_rows(tmp_path):
    path = tmp_path / "ledger.sqlite"
    now = time.time()
    write_rows(path, [
        row(1, key_id="a", gpu_seconds=3600.0, cost_usd=2.0, official_usd=0.5, holysheep_usd=0.1),
        row(2, key_id="b", backend="holysheep", cost_usd=0.3, official_usd=1.0, holysheep_usd=0.3,
            prompt_tokens=30, completion_tokens=10),
        row(3, key_id="a", status=503, prompt_tokens=0, completion_tokens=0, official_usd=0.0, holysheep_usd=0.0),
        row(4, ts=now - 10 * 86400, cost_usd=9.0, gpu_seconds=7200.0),  # outside --since 7d
    ])  # fmt: skip
    cfg = UsageConfig(gpu_hour_usd=2.0)
    report = build_report(path, cfg, since="7d", by="backend")
    totals = report["totals"]
    assert (totals["requests"], totals["overflow_requests"], totals["failed_requests"]) == (3, 1, 1)
    assert (totals["prompt_tokens"], totals["completion_tokens"], totals["overflow_tokens"]) == (40, 15, 40)
    assert totals["overflow_share"] == pytest.approx(1 / 3, abs=1e-6)
    assert totals["local_gpu_hours"] == 1.0
    costs = totals["cost_usd"]
    assert (costs["local"], costs["overflow"], costs["actual"]) == (2.0, 0.3, 2.3)
    assert (costs["if_official"], costs["if_holysheep"]) == (1.5, 0.4)
    assert costs["if_local"] == pytest.approx(2.0 / 15 * 55)  # the local $/token over every token
    assert [g["backend"] for g in report["groups"]] == ["holysheep", "local"]
    assert sum(g["requests"] for g in report["groups"]) == 3
    everything = build_report(path, cfg, since=None, by="key")
    assert everything["totals"]["requests"] == 4 and [g["key"] for g in everything["groups"]] == [
        "a",
        "b",
        "k",
    ]
    with pytest.raises(ValueError, match="--by"):
        build_report(path, cfg, by="colour")
    table = render(report, "table")
    assert "TOTAL" in table and "holysheep" in table and "prices as of" in table
    csv_text = render(report, "csv").splitlines()
    assert csv_text[0].startswith("backend,requests,overflow_share") and csv_text[-1].startswith("TOTAL,3,")


def test_since_parsing():
    assert parse_since("7d", now=1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("2026-01-01") == parse_since("2026-01-01T00:00:00+00:00")
    assert parse_since(None) is None
    with pytest.raises(ValueError, match="since"):
        parse_since("last tuesday")


def test_cli_usage_report(tmp_path, capsys):
    path = tmp_path / "ledger.sqlite"
    write_rows(path, [row(1, cost_usd=0.5), row(2, backend="holysheep", cost_usd=0.25)])
    profile = yaml.safe_load((CONFIG_DIR / "cpu.yaml").read_text())
    profile["usage"] = {"path": str(path), "gpu_hour_usd": 1.5}
    config = tmp_path / "profile.yaml"
    config.write_text(yaml.safe_dump(profile))
    assert cli_main(["usage", "report", "--config", str(config), "--format", "json", "--by", "backend"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpu_hour_usd"] == 1.5 and report["totals"]["requests"] == 2
    assert report["totals"]["cost_usd"]["actual"] == 0.75
    assert cli_main(["usage", "report", "--db", str(path), "--since", "1h"]) == 0
    assert "TOTAL" in capsys.readouterr().out
    assert cli_main(["usage", "report", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "no usage ledger" in capsys.readouterr().err
