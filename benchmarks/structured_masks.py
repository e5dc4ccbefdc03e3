"""xgrammar vs llguidance on this machine: schema compile time and per-step token-mask time for a batch of
constrained requests, with the embedded model's tokenizer (SmolLM2). Writes JSON (machine, commit, numbers).

    python -m benchmarks.structured_masks --batch 64 --steps 64 --out benchmarks/results/structured_masks.json

Each request of the batch walks a valid JSON document of the schema token by token (its tokens are
forced), so every step computes the masks of all rows, advances every matcher by one token and applies
the bitmask to a [batch, vocab] logits tensor: the work one decode step adds to the sampler."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "status": {"enum": ["active", "inactive", "banned"]},
    },
    "required": ["name", "age", "email", "tags", "address", "status"],
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines", "poetry"],
    "address": {"city": "London", "zip": "W1"},
    "status": "active",
}


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_xgrammar(tokenizer: Any, vocab: int, tokens: list[int], batch: int, steps: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t0
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    logits = torch.randn(batch, vocab)
    fill, apply, advance = [], [], []
    for step in range(min(steps, len(tokens))):
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        t1 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        t2 = time.perf_counter()
        for m in matchers:
            assert m.accept_token(tokens[step])
        fill.append(t1 - t0), apply.append(t2 - t1), advance.append(time.perf_counter() - t2)
    return {"compile_s": compile_s, **_steps(fill, apply, advance)}


def bench_llguidance(
    tokenizer: Any, vocab: int, tokens: list[int], batch: int, steps: int, parallel: bool
) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    ll_tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    first = llguidance.LLMatcher(ll_tok, grammar)
    first.compute_bitmask()  # llguidance builds its lexer lazily: the first mask is part of compiling
    compile_s = time.perf_counter() - t0
    matchers = [llguidance.LLMatcher(ll_tok, grammar) for _ in range(batch)]
    bitmask = llguidance.torch.allocate_token_bitmask(batch, vocab)
    logits = torch.randn(batch, vocab)
    executor = llguidance.LLExecutor()
    fill, apply, advance = [], [], []
    for step in range(min(steps, len(tokens))):
        t0 = time.perf_counter()
        if parallel:
            llguidance.torch.fill_next_token_bitmask_par(
                executor, list(zip(matchers, range(batch), strict=True)), bitmask
            )
        else:
            for i, m in enumerate(matchers):
                llguidance.torch.fill_next_token_bitmask(m, bitmask, i)
        t1 = time.perf_counter()
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        t2 = time.perf_counter()
        for m in matchers:
            assert m.consume_token(tokens[step]), m.get_error()
        fill.append(t1 - t0), apply.append(t2 - t1), advance.append(time.perf_counter() - t2)
    return {"compile_s": compile_s, **_steps(fill, apply, advance)}


def _steps(fill: list[float], apply: list[float], advance: list[float]) -> dict[str, Any]:
    total = [a + b + c for a, b, c in zip(fill, apply, advance, strict=True)]
    return {
        "fill_ms": _summary(fill),
        "apply_ms": _summary(apply),
        "advance_ms": _summary(advance),
        "step_ms": _summary(total),
    }


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "mean": statistics.fmean(ms),
        "p50": ms[len(ms) // 2],
        "p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "first": seconds[0] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/structured_masks.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from backends.loader import resolve_model_dir

    model_dir = resolve_model_dir(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tokenizer)
    tokens = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    result = {
        "benchmark": "structured_masks",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": _cpus()},
        "commit": _commit(),
        "model": model_dir.name,
        "vocab": vocab,
        "batch": args.batch,
        "steps": min(args.steps, len(tokens)),
        "torch_threads": torch.get_num_threads(),
        "xgrammar": bench_xgrammar(tokenizer, vocab, tokens, args.batch, args.steps),
        "llguidance": bench_llguidance(tokenizer, vocab, tokens, args.batch, args.steps, parallel=False),
        "llguidance_parallel": bench_llguidance(
            tokenizer, vocab, tokens, args.batch, args.steps, parallel=True
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
