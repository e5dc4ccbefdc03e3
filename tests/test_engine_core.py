"""The engine core in a process of its own (server/engine_core*.py) and the output processor that serves
its outputs (server/output_processor.py): what crosses the channel, a core killed mid-stream, aborts that
free every block, stop strings inside one step's several tokens, and no core left behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from server.app import create_app
from server.engine_api import EngineDeadError, EngineError, GenerateRequest
from server.engine_core_messages import (
    AbortRequests,
    AddRequest,
    RequestOutput,
    decode_input,
    encode,
    params_from_wire,
    params_to_wire,
)
from server.output_processor import OutputProcessor
from server.scheduler.request import SamplingParams
from server.structured_output import StructuredOutput
from tests.conftest import free_port, http_config, start_server, wait_until
from tests.engine_helpers import assert_kv_all_free, make_tiny_llama, smollm_dir, start_engine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir())


def test_sampling_params_cross_the_channel_unchanged():
    params = SamplingParams(
        max_tokens=7, temperature=0.3, seed=5, stop=["x"], stop_token_ids=[3], logprobs=2,
        logit_bias={17: -100.0, 4: 2.5}, structured=StructuredOutput("json", {"type": "object"}, "</think>"),
    )  # fmt: skip
    message = AddRequest("r", [1, 2, 3], params_to_wire(params), 1.5, "client")
    received = decode_input(encode(message))
    assert isinstance(received, AddRequest) and received.prompt_token_ids == [1, 2, 3]
    assert params_from_wire(received.params) == params
    assert params_from_wire(params_to_wire(SamplingParams())) == SamplingParams()
    huge = SamplingParams(max_tokens=10**30, top_k=10**30, stop_token_ids=[10**30, -(10**30)])
    wide = decode_input(encode(AddRequest("r", [1], params_to_wire(huge), 0.0, "")))
    assert params_from_wire(wide.params) == SamplingParams(
        max_tokens=2**63 - 1, top_k=2**63 - 1, stop_token_ids=[2**63 - 1, -(2**63)]
    )  # the same meaning: more than any context, no such token


def test_stop_string_inside_one_steps_tokens_cuts_there_and_aborts_the_core_request(smol_tokenizer):
    """Speculative decoding hands over several tokens in one step: a stop string completed by the second
    of five ends the choice there, drops the three after it, and tells the core to abort the request."""
    sent: list = []
    processor = OutputProcessor(smol_tokenizer, sent.append, prefix_caching=True)
    sink: asyncio.Queue = asyncio.Queue()
    params = SamplingParams(max_tokens=50, stop=["of Fr"])
    processor.add(GenerateRequest("req", [1, 2, 3], params), sink)
    ids = smol_tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    words = [smol_tokenizer.decode([t]) for t in ids]
    split = words.index(" of") + 1  # " of" | " France": the stop string spans two tokens
    processor.process([RequestOutput("req", ids[:split])])
    counts = processor.process([RequestOutput("req", ids[split : split + 5])])
    first, second = sink.get_nowait(), sink.get_nowait()
    assert first.text + second.text == "The capital " and second.finish_reason == "stop"
    assert second.stop_reason == "of Fr" and second.token_ids == ids[split : split + 1]
    assert second.num_output_tokens == split + 1 and counts.num_tokens == 1
    assert isinstance(sent[-1], AbortRequests) and sent[-1].request_ids == ["req"]
    assert not processor.has_unfinished()
    processor.process([RequestOutput("req", ids[split + 5 :])])  # what the core sent before the abort
    assert sink.empty()


def test_n_choices_wait_for_the_first_choices_prompt(smol_tokenizer):
    sent: list = []
    processor = OutputProcessor(smol_tokenizer, sent.append, prefix_caching=True)
    processor.add(GenerateRequest("g", [5] * 40, SamplingParams(max_tokens=3), n=3), asyncio.Queue())
    assert [m.request_id for m in sent] == ["g-0"] and processor.num_parked == [2, 80]
    processor.process([RequestOutput("g-0", [42])])
    assert [m.request_id for m in sent] == ["g-0", "g-1", "g-2"] and processor.num_parked == [0, 0]


def _kill_core(engine) -> int:
    pid = engine._client.process.pid
    os.kill(pid, signal.SIGKILL)
    return pid


def test_core_killed_mid_stream_fails_every_stream_and_health_turns_503(tiny_dir, loop_thread):
    engine = start_engine(tiny_dir, core_process=True, num_kv_blocks=64, num_threads=1)
    loop_thread.run(engine.start())
    app = create_app(http_config(), engine, manage_engine=False)
    server = start_server(loop_thread, app)
    body = {"model": server.serving.served_model_name, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 500, "stream": True, "ignore_eos": True}  # fmt: skip
    try:
        with server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events, killed = [], None
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3 and killed is None:
                    killed = time.monotonic()
                    _kill_core(engine)
        assert time.monotonic() - killed < 10  # seen through the process sentinel, not a timeout
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_dead"
        assert not engine.healthy()
        with server.http() as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            late = http.post("/v1/chat/completions", json={**body, "stream": False})
            assert late.status_code == 503
    finally:
        server.stop()
        loop_thread.run(engine.shutdown())
    assert not engine._client.process.is_alive()


def test_core_killed_while_idle_fails_the_next_request(tiny_dir):
    engine = start_engine(tiny_dir, core_process=True, num_kv_blocks=64, num_threads=1)

    async def main():
        await engine.start()
        try:
            _kill_core(engine)
            assert await asyncio.to_thread(wait_until, lambda: not engine.healthy(), 10)
            with pytest.raises(EngineDeadError, match="core process died"):
                async for _ in engine.generate(GenerateRequest("late", [1, 2, 3], SamplingParams())):
                    pass
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_abort_storm_frees_every_block_in_process_mode(tiny_dir):
    engine = start_engine(tiny_dir, core_process=True, num_kv_blocks=48, num_threads=1, max_num_seqs=16)
    params = SamplingParams(max_tokens=200, temperature=1.0, ignore_eos=True)

    async def one(i: int) -> None:
        gen = engine.generate(GenerateRequest(f"s{i}", [10 + i] * (20 + 7 * i), params, n=1 + i % 3))
        async for d in gen:
            if d.num_output_tokens >= i % 5:
                break  # the client goes away, at once or after a few tokens
        await gen.aclose()

    async def main():
        await engine.start()
        try:
            await asyncio.gather(*(one(i) for i in range(40)))
            settled = lambda: engine.load().num_running == 0 and engine.load().kv_usage == 0  # noqa: E731
            assert await asyncio.to_thread(wait_until, settled, 20)
            assert_kv_all_free(engine)
            after = GenerateRequest("after", [3, 4], SamplingParams(max_tokens=1, top_k=10**30))
            [result] = [d async for d in engine.generate(after)]
            assert result.finish_reason == "length"  # the core still serves
            biased = GenerateRequest("bias", [3, 4], SamplingParams(logit_bias={10**30: 1.0}))
            with pytest.raises(EngineError, match="outside the vocabulary"):
                [d async for d in engine.generate(biased)]
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_shutdown_leaves_no_core_process(tiny_dir):
    engine = start_engine(tiny_dir, core_process=True, num_kv_blocks=16, num_threads=1)
    process = engine._client.process

    async def main():
        await engine.start()
        await engine.shutdown()

    asyncio.run(main())
    assert not process.is_alive() and process.exitcode == 0


def test_core_that_fails_to_load_is_an_error_naming_its_cause(tmp_path):
    from server.engine_core_client import CoreLoadError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CoreLoadError, match=r"^\w+: \S"):  # the core's own error type and message
        start_engine(tmp_path, core_process=True)


def _serve_with(tmp_path, model_dir) -> tuple[list[str], dict[str, str], int]:
    from tests.serve_process import REPO, TEST_PROFILE

    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(TEST_PROFILE), "--port", str(port),
           "--set", f"engine.model={model_dir}", "--set", "engine.num_kv_blocks=32", "--set", "engine.attention_kernel=reference"]  # fmt: skip
    env = {**os.environ, "GLM_SERVE_STATE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    return cmd, env, port


def test_ctrl_c_on_serve_stops_its_core_process(tmp_path, tiny_dir):
    import psutil

    from tests.serve_process import wait_healthy

    cmd, env, port = _serve_with(tmp_path, tiny_dir)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log_path, timeout=300)
        [core] = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        assert proc.wait(60) == 0, log_path.read_text()
        core.wait(20)  # raises psutil.TimeoutExpired if the core outlived its server
    finally:
        proc.kill()


def test_serve_exits_nonzero_when_the_core_cannot_load(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    cmd, env, _ = _serve_with(tmp_path, broken)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "CoreLoadError" in done.stderr, done.stderr[-3000:]


def test_tensor_parallel_workers_belong_to_the_core_process_and_stop_with_it(tiny_dir):
    """TP=2 with the core in its own process: the core spawns the rank-1 worker, gives the same greedy
    tokens as TP=1 in a thread, and takes the worker with it at shutdown."""
    import psutil

    from tests.engine_helpers import random_prompts, run_requests

    prompts = random_prompts(3, 49152)
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True) for _ in prompts]
    tp1 = run_requests(start_engine(tiny_dir, num_kv_blocks=64, num_threads=1), prompts, params)
    engine = start_engine(
        tiny_dir, core_process=True, tensor_parallel_size=2, num_kv_blocks=64, num_threads=1
    )
    core = psutil.Process(engine._client.process.pid)
    [worker] = [c for c in core.children() if "spawn_main" in " ".join(c.cmdline())]
    tp2 = run_requests(engine, prompts, params)
    assert [r["tokens"] for r in tp2] == [r["tokens"] for r in tp1]
    assert not core.is_running()
    worker.wait(20)  # raises psutil.TimeoutExpired if the worker outlived its core
