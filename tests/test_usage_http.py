"""The usage ledger end to end: 200 mixed requests (served locally, overflowed to a second glm-serve,
abandoned by the client mid-stream, rejected 4xx and 503) leave exactly one row each, found by the
X-Request-Id every answer carries, with the token counts the client saw (the 401s leave none: an
unauthenticated request writes no row); the report's totals match
the rows, and GET /v1/usage (admin keys only) returns the same JSON as `glm-serve usage report`."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import yaml

from server.api_keys import api_key_id
from server.cli import main as cli_main
from server.config import CONFIG_DIR
from server.usage import BACKENDS
from tests.conftest import wait_until
from tests.test_overflow_http import (  # noqa: F401  (deploy and no_unexpected_errors are fixtures)
    ADMIN,
    FORCER,
    FULL,
    LOCAL_MODEL,
    REMOTE_MODEL,
    SOVEREIGN,
    TEST_PRICES,
    USER,
    Deployment,
    deploy,
    no_unexpected_errors,
)

TOKENS = 3  # max_tokens with ignore_eos: every finished request has exactly this many completion tokens
LONG = 400  # max_tokens of the requests the client abandons
ROWS = 195  # 200 requests, 5 of them unauthenticated (401: no row)


@dataclass
class Spec:
    kind: str
    path: str = "/v1/chat/completions"
    key: str = USER
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    abandon: bool = False


@dataclass
class Seen:
    spec: Spec
    status: int
    request_id: str
    served_by: str
    usage: dict[str, Any] | None
    finish_reason: str | None


def chat(i: int, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Count to {i % 7 + 2}."}], "max_tokens": TOKENS,
            "ignore_eos": True, **extra}  # fmt: skip


def completion(i: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": f"Number {i}:", "max_tokens": TOKENS, "ignore_eos": True, **extra}


FORCE = {"X-Overflow": "force"}
USAGE = {"stream_options": {"include_usage": True}}


def phase_a() -> list[Spec]:
    """The local engine reports no queue: only forced requests leave."""
    specs = [Spec("local", body=chat(i)) for i in range(60)]
    specs += [Spec("local", body=chat(i, stream=True, **USAGE)) for i in range(20)]
    specs += [Spec("local", "/v1/completions", body=completion(i)) for i in range(20)]
    specs += [Spec("overflow", key=FORCER, headers=FORCE, body=chat(i)) for i in range(10)]
    specs += [
        Spec("overflow", key=FORCER, headers=FORCE, body=chat(i, stream=True, **USAGE)) for i in range(5)
    ]
    specs += [Spec("overflow", key=FORCER, headers=FORCE, body=chat(i, stream=True)) for i in range(5)]
    specs += [Spec("abandoned", body=chat(i, stream=True, max_tokens=LONG), abandon=True) for i in range(10)]
    specs += [Spec("abandoned", key=FORCER, headers=FORCE, body=chat(i, stream=True, max_tokens=LONG), abandon=True)
              for i in range(5)]  # fmt: skip
    specs += [Spec("rejected", body=chat(i, temperature=5)) for i in range(5)]
    specs += [Spec("rejected", key="sk-wrong", body=chat(i)) for i in range(5)]
    specs += [Spec("rejected", body=chat(i, model="no-such-model")) for i in range(5)]
    specs += [Spec("rejected", headers=FORCE, body=chat(i)) for i in range(5)]
    specs += [Spec("rejected", headers={"X-Overflow": "sometimes"}, body=chat(i)) for i in range(5)]
    return specs


def phase_b() -> list[Spec]:
    """The local queue reports full: requests that may leave overflow, sovereign ones get 503."""
    specs = [Spec("overflow", body=chat(i)) for i in range(15)]
    specs += [Spec("overflow", body=chat(i, stream=True, **USAGE)) for i in range(10)]
    specs += [Spec("overflow", "/v1/completions", body=completion(i)) for i in range(5)]
    specs += [Spec("rejected", key=SOVEREIGN, body=chat(i)) for i in range(10)]
    return specs


async def send(http: httpx.AsyncClient, spec: Spec) -> Seen:
    body = {"model": LOCAL_MODEL, **spec.body}
    headers = {"Authorization": f"Bearer {spec.key}", **spec.headers}
    async with http.stream("POST", spec.path, json=body, headers=headers) as response:
        usage, finish = None, None
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if spec.abandon:
                    break  # leaving closes the connection mid-stream
                chunk = json.loads(line[len("data: ") :])
                usage = chunk.get("usage") or usage
                finish = next(
                    (c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")), finish
                )
        else:
            payload = json.loads(await response.aread())
            usage = payload.get("usage")
            finish = (payload.get("choices") or [{}])[0].get("finish_reason")
        return Seen(spec, response.status_code, response.headers["x-request-id"],
                    response.headers.get("x-served-by", ""), usage, finish)  # fmt: skip


async def send_all(url: str, specs: list[Spec], concurrency: int = 12) -> list[Seen]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:

        async def one(spec: Spec) -> Seen:
            async with gate:
                return await send(http, spec)

        return list(await asyncio.gather(*(one(s) for s in specs)))


def ledger_rows(d: Deployment) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(d.ledger) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM usage")]
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows), "two rows for one request"
    return by_id


def prompt_tokens_of(d: Deployment, body: dict[str, Any]) -> int:
    with d.local.http(headers={"Authorization": f"Bearer {USER}"}) as http:
        tokenized = http.post("/tokenize", json={"model": LOCAL_MODEL, "messages": body["messages"]})
    return tokenized.json()["count"]


@pytest.fixture(scope="module")
def mixed(deploy) -> tuple[Deployment, list[Seen]]:  # noqa: F811
    d = deploy()
    rng = random.Random(7)
    first, second = phase_a(), phase_b()
    rng.shuffle(first)
    rng.shuffle(second)
    d.local_engine.waiting = 0
    seen = asyncio.run(send_all(d.local.url, first))
    d.local_engine.waiting = FULL
    seen += asyncio.run(send_all(d.local.url, second))
    d.local_engine.waiting = None
    assert len(seen) == 200
    # the server ends an abandoned stream (and writes its row) after the client has gone
    assert wait_until(lambda: len(ledger_rows(d)) >= ROWS, timeout=60)
    return d, seen


API_OF = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}  # usage.api, by route


def test_one_row_per_request_with_the_counts_the_client_saw(mixed):
    d, seen = mixed
    rows = ledger_rows(d)
    assert len(rows) == ROWS and set(rows) == {s.request_id for s in seen if s.status != 401}
    kinds: dict[str, int] = {}
    for s in seen:
        kind = s.spec.kind
        kinds[kind] = kinds.get(kind, 0) + 1
        if s.status == 401:
            continue
        row = rows[s.request_id]
        assert row["status"] == s.status, (kind, row)
        assert row["key_id"] == api_key_id(s.spec.key)
        assert row["endpoint"] == s.spec.path and row["latency_s"] > 0
        assert row["api"] == (API_OF[s.spec.path] if s.status != 401 else None)  # 401: before routing
        if kind in ("local", "overflow"):
            backend = "local" if kind == "local" else "holysheep"
            assert s.status == 200 and row["backend"] == s.served_by == backend
            assert row["completion_tokens"] == TOKENS and row["finish_reason"] == s.finish_reason == "length"
            assert row["tokens_exact"] == 1 and row["ttft_s"] is not None
            if s.usage is not None:  # streams without include_usage: the client saw no count
                assert row["prompt_tokens"] == s.usage["prompt_tokens"]
                assert row["completion_tokens"] == s.usage["completion_tokens"]
            if kind == "overflow":
                assert row["upstream_model"] == REMOTE_MODEL and row["cost_usd"] == row["holysheep_usd"] > 0
                assert row["overflow_reason"] == ("forced" if s.spec.key == FORCER else "queue")
            else:
                assert row["gpu_seconds"] > 0
                assert row["cost_usd"] == pytest.approx(row["gpu_seconds"] / 3600 * 2.0)  # gpu_hour_usd 2.0
        elif kind == "abandoned":
            assert s.status == 200 and row["finish_reason"] == "abort"
            assert row["prompt_tokens"] == prompt_tokens_of(d, s.spec.body)
            assert 0 < row["completion_tokens"] < LONG
            assert row["backend"] == ("holysheep" if s.spec.key == FORCER else "local")
            # an abandoned upstream stream never sends its usage: the row's counts are estimates
            assert row["tokens_exact"] == (0 if s.spec.key == FORCER else 1)
        else:
            assert s.status in (400, 403, 404, 503) and row["backend"] == "local"
            assert (row["prompt_tokens"], row["completion_tokens"], row["finish_reason"]) == (0, 0, None)
    assert kinds == {"local": 100, "overflow": 50, "abandoned": 15, "rejected": 35}
    statuses = sorted(s.status for s in seen if s.spec.kind == "rejected")
    assert statuses == [400] * 10 + [401] * 5 + [403] * 5 + [404] * 5 + [503] * 10


def test_report_totals_match_the_rows_and_the_admin_endpoint(mixed, tmp_path, capsys):
    d, _ = mixed
    rows = list(ledger_rows(d).values())
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=d.local.url, timeout=60) as http:
        assert http.get("/v1/usage", headers={"Authorization": f"Bearer {USER}"}).status_code == 403
        served = http.get("/v1/usage", params={"by": "backend"}, headers=admin)
        assert served.status_code == 200
        assert http.get("/v1/usage", params={"by": "colour"}, headers=admin).status_code == 400
    report = served.json()
    totals = report["totals"]
    assert totals["requests"] == ROWS == len(rows)
    assert totals["overflow_requests"] == sum(r["backend"] == "holysheep" for r in rows) == 55
    assert totals["failed_requests"] == sum(r["status"] >= 400 for r in rows) == 30
    assert totals["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    assert totals["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert totals["overflow_share"] == round(55 / ROWS, 6)
    costs = totals["cost_usd"]
    spent = {
        backend: sum(r["cost_usd"] or 0 for r in rows if r["backend"] == backend) for backend in BACKENDS
    }
    assert costs["overflow"] == pytest.approx(spent["holysheep"], abs=1e-6)
    assert costs["local"] == pytest.approx(spent["local"], abs=1e-6)
    assert costs["if_official"] == pytest.approx(sum(r["official_usd"] or 0 for r in rows), abs=1e-6)
    assert totals["unpriced_tokens"]["official"] == 0  # every row has a model
    groups = {g["backend"]: g for g in report["groups"]}
    assert groups["holysheep"]["requests"] + groups["local"]["requests"] == ROWS

    profile = yaml.safe_load((CONFIG_DIR / "cpu.yaml").read_text())
    profile["usage"] = {"path": str(d.ledger), "gpu_hour_usd": 2.0, "prices": TEST_PRICES}
    config = tmp_path / "profile.yaml"
    config.write_text(yaml.safe_dump(profile))
    assert cli_main(["usage", "report", "--config", str(config), "--by", "backend", "--format", "json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    from_cli.pop("until"), report.pop("until")
    assert from_cli == report
