"""The bad-input corpus (tests/chaos/corpus.py, 500+ cases over every route) against a real server:
no 5xx, every answer within a bound, the OpenAI error object on every 4xx of the API, /health 200
after each case, and no traceback in the log (client errors are one access line each)."""

from __future__ import annotations

import json
import logging
import time

import httpx

from tests.chaos.corpus import MODEL, cases
from tests.conftest import API_KEY

CASE_TIMEOUT_S = 30.0


def send(http: httpx.Client, case) -> httpx.Response:
    headers = {"authorization": f"Bearer {API_KEY}", **case.headers}
    content = case.content
    if case.json is not None:
        content = json.dumps(case.json).encode()  # ASCII escapes: lone surrogates travel as \ud800
        headers.setdefault("content-type", "application/json")
    return http.request(case.method, case.path, content=content, headers=headers, params=case.params or None)


def test_bad_input_corpus_is_all_4xx_bounded_and_leaves_the_server_healthy(make_server, caplog, figures):
    server = make_server(served_model_name=MODEL, api_keys=[API_KEY], admin_keys=[API_KEY])
    corpus = cases()
    assert len(corpus) >= 300
    failures, statuses, slowest, timings = [], {}, 0.0, []
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=server.url, timeout=CASE_TIMEOUT_S) as http:
        for case in corpus:
            started = time.monotonic()
            try:
                response = send(http, case)
            except httpx.TimeoutException:
                failures.append(f"{case.label}: no answer within {CASE_TIMEOUT_S} s")
                continue
            took = time.monotonic() - started
            slowest = max(slowest, took)
            timings.append((took, case.label, response.status_code))
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append(f"{case.label}: {response.status_code} {response.text[:200]}")
            elif response.status_code >= 400 and case.path.startswith(("/v1/", "/tokenize", "/detokenize")):
                error = response.json().get("error")
                if not (isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)):
                    failures.append(f"{case.label}: not an OpenAI error object: {response.text[:200]}")
            health = http.get("/health")
            if health.status_code != 200:
                failures.append(f"{case.label}: /health {health.status_code} afterwards")
    tracebacks = [r for r in caplog.records if r.exc_info and r.exc_info[2] is not None]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    figures["bad_inputs"] = {
        "cases": len(corpus), "5xx": sum(n for s, n in statuses.items() if s >= 500), "statuses": statuses,
        "slowest_answer_s": round(slowest, 3), "tracebacks_logged": len(tracebacks),
    }  # fmt: skip
    print("slowest cases:", sorted(timings, reverse=True)[:8])
    assert not failures, "\n".join(failures[:30])
    assert not tracebacks and not errors, [r.getMessage() for r in errors][:5]
    assert statuses.get(200, 0) >= 10  # the odd-but-valid cases were served, not refused
