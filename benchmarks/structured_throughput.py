"""Output throughput of json_schema requests against the same requests unconstrained, on the native
engine serving the embedded model (SmolLM2), in one run. Writes JSON (machine, commit, numbers).

    python -m benchmarks.structured_throughput --concurrency 16 --requests 16 --rounds 3 --out benchmarks/results/structured_throughput.json

`concurrency` workers each send the next request as soon as theirs finishes. In each round the json_schema
phase runs first; the plain phase then sends the same requests (prompt, seed) unconstrained, each made to generate
exactly as many tokens as its constrained twin, so both phases compute the same tokens and the ratio of
their output throughputs is the cost of the constraint. The grammar mask's time per engine step comes
from the engine's GrammarMatchers."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from benchmarks.structured_masks import _commit, _cpus
from server.config import EngineConfig
from server.engine import NativeEngine
from server.engine_api import GenerateRequest
from server.scheduler.request import SamplingParams
from server.structured_output import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PROMPT = "Reply with a JSON object describing a person: name, age, city and hobbies."


async def phase(
    engine: NativeEngine, prompt: list[int], lengths: list[int] | None, concurrency: int, requests: int
) -> dict:
    """`requests` requests, `concurrency` at a time. lengths None: json_schema requests (each ends when its
    JSON is complete); else the same requests unconstrained, each generating exactly the tokens its
    constrained twin did (ignore_eos), so that both phases compute the same tokens."""
    pending = list(range(requests))
    out_lengths = [0] * requests
    structured = StructuredOutput("json", SCHEMA) if lengths is None else None

    async def worker() -> None:
        while pending:
            i = pending.pop(0)
            max_tokens = 96 if lengths is None else lengths[i]
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0,
                seed=i,
                structured=structured,
                ignore_eos=lengths is not None,
            )
            request = GenerateRequest(
                f"bench-{lengths is None}-{i}", prompt, params, arrival_time=time.monotonic()
            )
            async for delta in engine.generate(request):
                out_lengths[i] += len(delta.token_ids)

    grammars = engine.core.runner.grammars  # the core runs in a thread here (core_process=False)
    mask_s, mask_steps = grammars.mask_seconds, grammars.mask_steps
    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    steps = grammars.mask_steps - mask_steps
    return {
        "constrained": lengths is None,
        "seconds": elapsed,
        "requests": requests,
        "lengths": out_lengths,
        "output_tokens": sum(out_lengths),
        "output_tokens_per_s": sum(out_lengths) / elapsed,
        "mask_ms_per_step": (grammars.mask_seconds - mask_s) * 1000 / steps if steps else 0.0,
        "masked_steps": steps,
    }


async def main_async(args: argparse.Namespace) -> dict:
    engine = NativeEngine(
        EngineConfig(max_num_seqs=args.concurrency, kv_cache_bytes=512 << 20, core_process=False)
    )
    await engine.start()
    try:
        tokenizer = engine.tokenizer
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
        )
        prompt = tokenizer.encode(rendered, add_special_tokens=False)
        await phase(engine, prompt, None, args.concurrency, args.concurrency)  # warm-up: compile, caches
        phases = []
        for _ in range(args.rounds):  # short alternating rounds: drift in the host's load falls on both
            constrained = await phase(engine, prompt, None, args.concurrency, args.requests)
            phases += [
                constrained,
                await phase(engine, prompt, constrained["lengths"], args.concurrency, args.requests),
            ]
    finally:
        await engine.shutdown()
    constrained_phases = [p for p in phases if p["constrained"]]
    plain_phases = [p for p in phases if not p["constrained"]]
    json_rate = sum(p["output_tokens"] for p in constrained_phases) / sum(
        p["seconds"] for p in constrained_phases
    )
    plain_rate = sum(p["output_tokens"] for p in plain_phases) / sum(p["seconds"] for p in plain_phases)
    steps = sum(p["masked_steps"] for p in constrained_phases)
    return {
        "benchmark": "structured_throughput",
        "machine": {"cpus": _cpus()},
        "commit": _commit(),
        "backend": "native",
        "profile": "cpu",
        "model": engine.model_name,
        "library": "llguidance",
        "concurrency": args.concurrency,
        "phases": phases,
        "plain_output_tokens_per_s": plain_rate,
        "json_schema_output_tokens_per_s": json_rate,
        "ratio": json_rate / plain_rate,
        "mask_ms_per_step": sum(p["mask_ms_per_step"] * p["masked_steps"] for p in constrained_phases)
        / max(1, steps),
        "step_ms_constrained": 1000 * sum(p["seconds"] for p in constrained_phases) / max(1, steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/structured_throughput.json"))
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=2))


if __name__ == "__main__":
    main()
