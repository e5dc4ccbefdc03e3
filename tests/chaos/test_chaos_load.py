"""Load and connection faults against in-process servers sharing the session's engine: disconnect storms
and slow readers (KV back to 0), a huge batch while other clients are served, half-sent bodies (no
in-flight slot, bounded memory, 408 at the deadline, small requests still served), and the in-flight and
per-key limits. (/health while large bodies are tokenized: test_chaos_process.py, a server of its own.)"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import psutil

from tests.conftest import API_KEY, wait_until

CHAT = "/v1/chat/completions"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def chat_body(server, content: str = "Tell me a story.", **fields) -> dict:
    body = {"model": server.serving.served_model_name, "messages": [{"role": "user", "content": content}]}
    return {**body, "max_tokens": 4, **fields}


def engine_idle(engine) -> bool:
    load = engine.load()
    return load.num_running == 0 and load.num_waiting == 0 and load.kv_usage == 0.0


def test_disconnect_storm_and_slow_readers_leave_no_kv_blocks(server, engine, figures):
    long = chat_body(server, max_tokens=300, ignore_eos=True, stream=True)

    async def read_first_then_leave(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", CHAT, json=long) as response:
            async for _ in response.aiter_lines():
                return

    async def give_up_early(http: httpx.AsyncClient) -> None:
        try:
            await http.post(CHAT, json={**long, "stream": False}, timeout=0.3)
        except httpx.TimeoutException:
            pass

    async def slow_reader(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", CHAT, json=long) as response:
            async for i, _ in _enumerate(response.aiter_lines()):
                await asyncio.sleep(0.2)
                if i >= 10:
                    return

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=HEADERS) as http:
            storm = [read_first_then_leave(http) for _ in range(30)] + [
                give_up_early(http) for _ in range(10)
            ]
            await asyncio.gather(*storm, *(slow_reader(http) for _ in range(5)))

    started = time.monotonic()
    asyncio.run(main())
    assert wait_until(lambda: engine_idle(engine), timeout=60), engine.load()
    assert wait_until(lambda: server.serving.in_flight == 0, timeout=10)
    figures["disconnect_storm"] = {"clients": 45, "seconds_to_kv_zero": round(time.monotonic() - started, 2)}


async def _enumerate(lines):
    i = 0
    async for line in lines:
        yield i, line
        i += 1


def test_a_huge_batch_is_refused_at_once_and_a_large_one_does_not_starve_others(server, engine, figures):
    model = server.serving.served_model_name
    with httpx.Client(base_url=server.url, timeout=120, headers=HEADERS) as http:
        started = time.monotonic()
        huge = http.post("/v1/completions", json={"model": model, "prompt": ["x"] * 150_000, "max_tokens": 1})
        refused_in = time.monotonic() - started
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "too_many_prompts"
    assert "max_prompts_per_request" in huge.json()["error"]["message"]
    assert engine.load().num_waiting == 0

    limits = server.serving.config.server
    size = limits.max_prompts_per_request  # prompts of ~200 tokens: admitted over several steps' budgets
    prompts = [f"Item {i}: " + "lorem ipsum dolor sit amet " * 20 for i in range(size)]
    batch = {"model": model, "prompt": prompts, "max_tokens": 8, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60, headers=HEADERS) as http:
        tokens_each = http.post("/tokenize", json={"model": model, "prompt": prompts[-1]}).json()["count"]
    budget = server.serving.config.engine.max_num_batched_tokens
    # under the long-prefill threshold (a quarter of the budget), where prefill fairness would let short
    # requests pass anyway, and more than fit one step all together
    assert tokens_each < budget // 4 and tokens_each * size > 4 * budget

    async def first_tokens(http: httpx.AsyncClient, path: str, body: dict) -> dict[int, float]:
        """The time each choice's first token arrived."""
        firsts: dict[int, float] = {}
        async with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        firsts.setdefault(choice["index"], time.monotonic())
        return firsts

    short = {"model": model, "prompt": "Tell me a story.", "max_tokens": 4, "stream": True}

    async def main() -> tuple[dict[int, float], list[float], float, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300, headers=HEADERS) as http:
            started = time.monotonic()
            big = asyncio.ensure_future(first_tokens(http, "/v1/completions", batch))
            while engine.load().num_waiting < size // 2:  # the batch is queued, most of it still waiting
                assert time.monotonic() - started < 120 and not big.done()
                await asyncio.sleep(0.01)
            sent = time.monotonic()
            others = await asyncio.gather(*(first_tokens(http, "/v1/completions", short) for _ in range(3)))
            return await big, [other[0] for other in others], started, sent

    big, others_first, started, sent = asyncio.run(main())
    assert len(big) == size
    behind = sum(first > max(others_first) for first in big.values())
    figures["large_batch"] = {
        "refused_150k_prompts_in_s": round(refused_in, 3), "batch_sequences": size,
        "batch_prompt_tokens_each": tokens_each, "others_sent_after_s": round(sent - started, 2),
        "others_ttft_s": [round(first - sent, 2) for first in others_first],
        "batch_first_tokens_after_all_others": behind,
        "batch_last_first_token_s": round(max(big.values()) - started, 2),
    }  # fmt: skip
    # the other clients took their turns ahead of the batch's waiting prompts: their first tokens came
    # before a quarter or more of the batch's (first come first served, they would come after all 64)
    assert behind >= size // 4, figures["large_batch"]


def half_send(port: int, declared: int, sent: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: {declared}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode())
    try:
        sock.sendall(b"x" * sent)
    except OSError:  # the server answered (503) and stopped reading: fine
        pass
    return sock


def status_of(sock: socket.socket, timeout: float) -> int | None:
    sock.settimeout(timeout)
    try:
        data = sock.recv(64)
    except OSError:
        return None
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


def test_half_sent_bodies_hold_no_slot_bounded_memory_and_get_408(make_server, figures):
    cap = 32 * 1024 * 1024
    server = make_server(body_read_timeout_s=3.0, max_pending_body_bytes=cap)
    process = psutil.Process()
    before = process.memory_info().rss
    sockets = [half_send(server.port, 4 * 1024 * 1024 - 1, 1024 * 1024) for _ in range(60)]  # 60 MiB sent
    time.sleep(0.5)
    grown = process.memory_info().rss - before
    assert server.serving.in_flight == 0  # half-sent bodies are not in flight: the drain never waits on them
    with httpx.Client(base_url=server.url, timeout=60, headers=HEADERS) as http:
        assert http.post(CHAT, json=chat_body(server)).status_code == 200  # still serving meanwhile
    statuses = [status_of(sock, timeout=10) for sock in sockets]
    for sock in sockets:
        sock.close()
    figures["half_sent_bodies"] = {
        "connections": len(sockets), "bytes_sent_mib": 60, "pending_cap_mib": cap >> 20,
        "rss_growth_mib": round(grown / 2**20, 1),
        "statuses": {str(s): statuses.count(s) for s in set(statuses)},
    }  # fmt: skip
    assert set(statuses) <= {408, 503} and statuses.count(408) >= 1 and statuses.count(503) >= 1
    assert grown < cap + 48 * 1024 * 1024, figures["half_sent_bodies"]
    assert wait_until(lambda: server.serving.in_flight == 0)


def test_in_flight_and_per_key_limits_answer_with_retry_after(make_server):
    keys = ["sk-limit-a", "sk-limit-b"]
    server = make_server(api_keys=keys, max_in_flight_requests=2, max_concurrent_requests_per_key=1)
    body = chat_body(server, max_tokens=200, ignore_eos=True, stream=True)

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", CHAT, json=body, headers=auth(keys[0])) as first:
            first_lines = first.iter_lines()  # kept: a dropped line iterator closes the stream
            next(first_lines)
            same_key = http.post(CHAT, json=chat_body(server), headers=auth(keys[0]))
            assert same_key.status_code == 429 and same_key.headers["retry-after"]
            assert same_key.json()["error"]["code"] == "concurrency_limit_exceeded"
            with http.stream("POST", CHAT, json=body, headers=auth(keys[1])) as second:
                second_lines = second.iter_lines()
                next(second_lines)
                full = http.post(CHAT, json=chat_body(server), headers=auth(keys[1]))
                assert full.status_code == 503 and full.headers["retry-after"]
                assert full.json()["error"]["code"] == "too_many_requests_in_flight"
                assert http.get("/health").status_code == 200  # never refused for load
        assert wait_until(lambda: server.serving.in_flight == 0)
        assert http.post(CHAT, json=chat_body(server), headers=auth(keys[0])).status_code == 200


def test_requests_past_the_connection_cap_get_503_with_retry_after(make_server):
    """In process the cap counts requests under way (bodies still arriving included); a serve process
    also counts uvicorn's open connections (test_chaos_process.py)."""
    server = make_server(max_connections=3, body_read_timeout_s=30.0)
    sockets = [half_send(server.port, 1000, 10) for _ in range(3)]
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers=HEADERS) as http:
            assert wait_until(lambda: http.get("/v1/models").status_code == 503, timeout=10)
            refused = http.post(CHAT, json=chat_body(server))
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"
            assert refused.json()["error"]["code"] == "too_many_connections"
            assert http.get("/health").status_code == 200  # probes are never refused for load
    finally:
        for sock in sockets:
            sock.close()
    with httpx.Client(base_url=server.url, timeout=60, headers=HEADERS) as http:
        assert wait_until(lambda: http.get("/v1/models").status_code == 200, timeout=10)
        assert http.post(CHAT, json=chat_body(server)).status_code == 200
