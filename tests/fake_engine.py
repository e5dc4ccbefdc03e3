"""TEST DOUBLE: a deterministic engine that implements server.engine_api.Engine without a model.

It exists so the HTTP front end can be tested end to end before (and independently of) the real engine.
It honours the protocol's semantics the way NativeEngine does:

- a step loop: every `token_delay_s`, each running choice gets one new token (continuous batching in
  miniature); at most `max_num_seqs` choices run, the rest wait, so load() reports real queues;
- per-choice deltas with cumulative num_output_tokens; n choices per request; `first_token_time`;
- sampling: greedy (temperature 0) depends only on the prompt; a seed makes a sampled choice
  reproducible (seed mixed with the choice index); no seed is random;
- max_tokens -> "length"; a rare EOS -> "stop" unless ignore_eos; min_tokens holds EOS and stops back;
  stop strings and stop_token_ids are applied here, by the engine (text is held back while it could
  still be the start of a stop string, and cut before the stop string unless include_stop_str_in_output);
- logprobs: the sampled token's logprob plus `params.logprobs` alternatives;
- KV blocks: ceil(tokens / block_size) per choice out of num_kv_blocks; freed on finish and on abort,
  and cancelling the generate() iterator aborts the request;
- load(), stats() and healthy() report what happened; kill() simulates a dead engine loop.

Its tokenizer is a real transformers tokenizer (byte-level BPE without merges: one token per byte) with
a ChatML chat template that renders tools and an `enable_thinking` kwarg.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.config import EngineConfig
from server.engine_api import (
    Delta,
    EngineDeadError,
    EngineError,
    GenerateRequest,
    Load,
    TokenLogprob,
    TopLogprob,
)

EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
WORDS = ("alpha", "beta", "gamma", "delta", "kernel", "token", "stream", "cache", "block", "serve", "model")
TOKEN_DELAY_ENV = "GLM_FAKE_TOKEN_DELAY_S"


def make_test_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A tiny real tokenizer: byte-level BPE with no merges, special tokens, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS, "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(slots=True, eq=False)
class _Choice:
    request_id: str
    index: int
    prompt_ids: list[int]
    rng: random.Random
    queue: asyncio.Queue
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    word: str = ""
    first_token_time: float | None = None
    finished: bool = False


@dataclass(slots=True, eq=False)
class _Request:
    gen: GenerateRequest
    choices: list[_Choice]


class FakeEngine:
    """Test double for server.engine_api.Engine (see the module docstring)."""

    def __init__(self, engine_config: EngineConfig | None = None, *, token_delay_s: float | None = None):
        cfg = engine_config or EngineConfig()
        self.model_name = "fake-engine"
        self.max_model_len = cfg.max_model_len or 2048
        self.max_num_seqs = cfg.max_num_seqs
        self.block_size = cfg.block_size
        self.num_kv_blocks = cfg.num_kv_blocks or 4096
        self.tokenizer = make_test_tokenizer()
        self.eos_token_id: int = self.tokenizer.eos_token_id
        self.token_delay_s = (
            token_delay_s if token_delay_s is not None else float(os.environ.get(TOKEN_DELAY_ENV, "0.002"))
        )
        self.eos_probability = 0.01
        self.start_calls = 0
        self.shutdown_calls = 0
        self._alphabet = [self.tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"]
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Choice] = deque()
        self._running: list[_Choice] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._dead = False
        self._counters = {
            "prompt_tokens_total": 0.0,
            "generation_tokens_total": 0.0,
            "num_preemptions_total": 0.0,
        }
        self._recent_tokens: deque[tuple[float, int]] = deque(maxlen=256)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.start_calls += 1
        self._dead = False
        self._wakeup = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        self.shutdown_calls += 1
        deadline = time.monotonic() + drain_timeout
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for request_id in list(self._requests):
            self._abort_now(request_id)
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    def kill(self) -> None:
        """Simulate the engine loop dying: healthy() turns False and generate() raises EngineDeadError."""
        self._dead = True

    def revive(self) -> None:
        self._dead = False

    def healthy(self) -> bool:
        return not self._dead and self._loop_task is not None and not self._loop_task.done()

    # -- requests ----------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if not self.healthy():
            raise EngineDeadError("the fake engine is not running")
        self._validate(request)
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        seed = request.params.seed
        choices = [
            _Choice(request.request_id, i, request.prompt_token_ids, self._rng_for(request, seed, i), queue)
            for i in range(request.n)
        ]
        self._requests[request.request_id] = _Request(request, choices)
        self._waiting.extend(choices)
        self._counters["prompt_tokens_total"] += len(request.prompt_token_ids)
        assert self._wakeup is not None
        self._wakeup.set()
        remaining = request.n
        try:
            while remaining:
                delta = await queue.get()
                if delta.finished:
                    remaining -= 1
                yield delta
        finally:
            if remaining:
                self._abort_now(request.request_id)
            self._requests.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    def load(self) -> Load:
        now = time.monotonic()
        recent = [n for t, n in self._recent_tokens if now - t < 1.0]
        rate = float(sum(recent))
        return Load(
            num_running=len({c.request_id for c in self._running}),
            num_waiting=len({c.request_id for c in self._waiting}),
            kv_usage=self._used_blocks() / self.num_kv_blocks,
            est_wait_s=len(self._waiting) * self.token_delay_s * 16,
            gen_tokens_per_s=rate,
        )

    def stats(self) -> dict[str, float]:
        return dict(self._counters)

    # -- internals ---------------------------------------------------------------------------------
    def _validate(self, request: GenerateRequest) -> None:
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            raise EngineError("the prompt is empty")
        if n_prompt + request.params.max_tokens > self.max_model_len:
            raise EngineError(
                f"{n_prompt} prompt tokens + {request.params.max_tokens} > {self.max_model_len}"
            )
        if request.request_id in self._requests:
            raise EngineError(f"duplicate request id {request.request_id}")

    @staticmethod
    def _rng_for(request: GenerateRequest, seed: int | None, index: int) -> random.Random:
        if request.params.greedy:
            return random.Random(zlib.crc32(bytes(str(request.prompt_token_ids), "ascii")))
        if seed is None:
            return random.Random()
        return random.Random(seed * 1_000_003 + index)

    def _used_blocks(self) -> int:
        return sum(
            math.ceil((len(c.prompt_ids) + len(c.output_ids)) / self.block_size) for c in self._running
        )

    def _abort_now(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        for choice in request.choices:
            if not choice.finished:
                self._finish(choice, "abort", None, request)

    async def _step_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._running and not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            await asyncio.sleep(self.token_delay_s)
            if self._dead:
                continue
            self._admit_waiting()
            for choice in list(self._running):
                self._step(choice)

    def _admit_waiting(self) -> None:
        while self._waiting and len(self._running) < self.max_num_seqs:
            choice = self._waiting[0]
            needed = math.ceil((len(choice.prompt_ids) + 1) / self.block_size)
            if self._used_blocks() + needed > self.num_kv_blocks:
                return
            self._running.append(self._waiting.popleft())

    def _step(self, choice: _Choice) -> None:
        request = self._requests[choice.request_id]
        params = request.gen.params
        token_id = self._sample(choice, params.ignore_eos or len(choice.output_ids) < params.min_tokens)
        now = time.monotonic()
        choice.first_token_time = choice.first_token_time or now
        choice.output_ids.append(token_id)
        self._counters["generation_tokens_total"] += 1
        self._recent_tokens.append((now, 1))
        finish, stop_reason = None, None
        held_back = max((len(s) for s in params.stop), default=1) - 1
        can_stop = len(choice.output_ids) > params.min_tokens
        if token_id == self.eos_token_id:
            finish = "stop"
        elif token_id in params.stop_token_ids and can_stop:
            finish, stop_reason = "stop", token_id
        else:
            choice.text += self.tokenizer.decode([token_id])
            hit = self._find_stop(choice.text, params.stop) if can_stop else None
            if hit is not None:
                position, stop = hit
                end = position + len(stop) if params.include_stop_str_in_output else position
                choice.text = choice.text[: max(end, choice.emitted_chars)]
                finish, stop_reason = "stop", stop
        if finish is None and len(choice.output_ids) >= params.max_tokens:
            finish = "length"
        if finish is None:
            self._emit(
                choice, [token_id], request, upto=max(choice.emitted_chars, len(choice.text) - held_back)
            )
        else:
            self._finish(choice, finish, stop_reason, request, last_token=token_id)

    def _sample(self, choice: _Choice, suppress_eos: bool) -> int:
        if not suppress_eos and choice.rng.random() < self.eos_probability:
            return self.eos_token_id
        if not choice.word:
            choice.word = choice.rng.choice(WORDS) + " "
        char, choice.word = choice.word[0], choice.word[1:]
        return self.tokenizer.convert_tokens_to_ids("Ġ" if char == " " else char)

    @staticmethod
    def _find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
        """The earliest stop string that the newest character completed (text grows one char a step)."""
        window_start = max(0, len(text) - max((len(s) for s in stops), default=0))
        best: tuple[int, str] | None = None
        for stop in stops:
            position = text.find(stop, window_start)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        return best

    def _emit(self, choice: _Choice, token_ids: list[int], request: _Request, *, upto: int, **finish) -> None:
        text = choice.text[choice.emitted_chars : upto]
        choice.emitted_chars = max(choice.emitted_chars, upto)
        params = request.gen.params
        logprobs = (
            [self._logprob(choice, t, params.logprobs) for t in token_ids]
            if params.logprobs is not None
            else None
        )
        choice.queue.put_nowait(
            Delta(
                index=choice.index,
                text=text,
                token_ids=token_ids,
                num_prompt_tokens=len(choice.prompt_ids),
                num_output_tokens=len(choice.output_ids),
                logprobs=logprobs,
                first_token_time=choice.first_token_time,
                **finish,
            )
        )

    def _finish(
        self,
        choice: _Choice,
        reason: str,
        stop_reason: int | str | None,
        request: _Request,
        last_token: int | None = None,
    ) -> None:
        choice.finished = True
        if choice in self._running:
            self._running.remove(choice)
        if choice in self._waiting:
            self._waiting.remove(choice)
        token_ids = [last_token] if last_token is not None else []
        self._emit(
            choice, token_ids, request, upto=len(choice.text), finish_reason=reason, stop_reason=stop_reason
        )

    def _logprob(self, choice: _Choice, token_id: int, k: int) -> TokenLogprob:
        token = self.tokenizer.decode([token_id])
        value = -round(0.05 + (zlib.crc32(bytes([token_id % 256, choice.index])) % 1000) / 400, 4)
        alternatives = [t for t in self._alphabet if t != token_id][: max(0, k - 1)]
        top = [TopLogprob(token_id, token, value)] if k > 0 else []
        top += [
            TopLogprob(t, self.tokenizer.decode([t]), value - 1.0 - i) for i, t in enumerate(alternatives)
        ]
        return TokenLogprob(token_id, token, value, top)
