"""/metrics under vLLM's names on both engines: each family once (with the vllm backend, vLLM's own
registry and ours are merged), prefix-cache counters, per-request token histograms, cache_config_info."""

from __future__ import annotations

import httpx

from tests.conftest import metric_value

SHARED_PREFIX = "Repeat these words exactly: " + "the quick brown fox jumps over the lazy dog " * 12


def scrape(server) -> str:
    with httpx.Client(timeout=30) as http:
        return http.get(f"{server.url}/metrics").text


def test_each_family_once_with_prefix_cache_and_token_histograms(server, client):
    before = scrape(server)
    for _ in range(2):  # the second request finds the first one's full prompt blocks cached
        client.chat.completions.create(
            model=server.serving.served_model_name,
            messages=[{"role": "user", "content": SHARED_PREFIX}],
            max_tokens=3,
            temperature=0,
        )
    text = scrape(server)
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(families) == len(set(families)), sorted(n for n in families if families.count(n) > 1)

    def grew(name: str) -> float:
        return (metric_value(text, name) or 0.0) - (metric_value(before, name) or 0.0)

    assert grew("vllm:prefix_cache_queries_total") >= 2 * 100  # two prompts of more than 100 tokens
    assert grew("vllm:prefix_cache_hits_total") >= 64  # the second prompt's leading full blocks
    assert grew("vllm:request_prompt_tokens_count") == 2
    assert grew("vllm:request_generation_tokens_sum") >= 2
    assert metric_value(text, "vllm:num_preemptions_total") is not None
    info = next(line for line in text.splitlines() if line.startswith("vllm:cache_config_info{"))
    assert 'block_size="' in info and 'enable_prefix_caching="True"' in info and info.endswith(" 1.0")
    assert (
        metric_value(text, "glm_serve:http_requests_total", route="/v1/chat/completions", status="200") >= 2
    )
