"""Speculative decoding benchmark: the native engine with ngram prompt lookup (k=3) against the same engine
without speculation and, with --with-vllm, vLLM-CPU's ngram speculation with the same settings, in one run.

Workload: edit requests whose answers copy their input. Each prompt asks SmolLM2-135M (the embedded default)
to return a passage of this repository's documentation (200-500 tokens) with its typos fixed; greedy, up to
--max-tokens output tokens. Concurrency 1 (requests one after another) and 16 (all at once). Then the
off-switch: --random-concurrency (64) requests of random tokens (256 in, 128 out, ignore_eos), where prompt
lookup rarely matches, with ngram and disable_by_batch_size (--disable-by-batch-size, 32) against plain
decoding: the threshold should turn drafting off, so the ratio stays near 1. Reported per
run: output tok/s (all output tokens / wall time) and TPOT (per request (end - first token) / (tokens - 1),
averaged), the acceptance counters, and whether the outputs equal the non-speculative ones.

    python benchmarks/spec_decode.py [--threads 2] [--with-vllm] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.offline_throughput import cpu_model, git_commit  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine import NativeEngine  # noqa: E402
from server.engine_api import GenerateRequest  # noqa: E402
from server.scheduler.request import SamplingParams  # noqa: E402

INSTRUCTION = "Fix any typos in the following text and return it otherwise unchanged, nothing else:\n\n"
# --smoke's passages: fixed, so that the smoke test does not change with the docs the full run samples.
SMOKE_PASSAGES = [
    "The server reads its profile, loads the model, and then answers requests on port 8000. Each request "
    "is queued, scheduled and streamed back to the client token by token until it is done.",
    "Every morning the baker lights the oven, mixes the flour with water and salt, and shapes the dough "
    "into loaves. By seven the bread is on the shelves and the first customers are at the door.",
]


def passages(tokenizer, count: int, token_range: tuple[int, int], seed: int) -> list[str]:
    """Runs of whole paragraphs of docs/*.md, each token_range[0]..token_range[1] tokens long."""
    paragraphs = [
        p.strip()
        for doc in sorted((ROOT / "docs").glob("*.md"))
        for p in doc.read_text().split("\n\n")
        if len(p.strip()) > 80 and not p.lstrip().startswith(("|", "```"))
    ]
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        start = rng.randrange(len(paragraphs))
        text = ""
        for p in paragraphs[start:]:
            candidate = f"{text}\n\n{p}" if text else p
            if len(tokenizer.encode(candidate)) > token_range[1]:
                break
            text = candidate
        if len(tokenizer.encode(text)) >= token_range[0]:
            out.append(text)
    return out


def make_prompts(model_dir: Path, args) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.smoke:
        texts = SMOKE_PASSAGES[: args.num_requests]
    else:
        texts = passages(tokenizer, args.num_requests, tuple(args.passage_tokens), args.seed)
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": INSTRUCTION + t}], add_generation_prompt=True, return_dict=False
            )
        )
        for t in texts
    ]


def random_prompts(model_dir: Path, count: int, length: int, seed: int) -> list[list[int]]:
    """Prompts of uniformly random non-special token ids (the serving benchmark's random workload)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_ids)
    rng = random.Random(seed)
    ordinary = [t for t in range(len(tokenizer)) if t not in special]
    return [[rng.choice(ordinary) for _ in range(length)] for _ in range(count)]


def run_native(
    model_dir: Path,
    prompts: list[list[int]],
    concurrency: int,
    spec: dict | None,
    args,
    params: SamplingParams | None = None,
) -> dict:
    cfg = EngineConfig(
        model=str(model_dir),
        num_threads=args.threads,
        kv_cache_bytes=1 << 30,
        max_num_seqs=max(concurrency, 1),
        attention_kernel=args.attention_kernel,
        speculative_config=spec,
    )
    engine = NativeEngine(cfg)
    engine.load_model()
    params = params or SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    async def one(i: int) -> dict:
        t0 = time.perf_counter()
        first, tokens = None, []
        async for d in engine.generate(GenerateRequest(f"b{i}", prompts[i], params)):
            if d.token_ids and first is None:
                first = time.perf_counter()
            tokens += d.token_ids
        return {"tokens": tokens, "ttft": first - t0, "end": time.perf_counter() - t0}

    async def main() -> tuple[list[dict], float]:
        await engine.start()
        t0 = time.perf_counter()
        done: list[dict] = []
        for start in range(0, len(prompts), concurrency):  # waves of `concurrency` requests
            batch = range(start, min(start + concurrency, len(prompts)))
            done += await asyncio.gather(*(one(i) for i in batch))
        elapsed = time.perf_counter() - t0
        await engine.shutdown()
        return done, elapsed

    done, elapsed = asyncio.run(main())
    out = summarize(done, elapsed)
    stats = engine.stats()
    if spec is not None:
        drafted = stats["spec_decode_num_draft_tokens_total"]
        out["acceptance_rate"] = stats["spec_decode_num_accepted_tokens_total"] / drafted if drafted else 0.0
        out["mean_accepted_per_draft"] = stats["spec_decode_num_accepted_tokens_total"] / max(
            1.0, stats["spec_decode_num_drafts_total"]
        )
    out["outputs"] = [r["tokens"] for r in done]
    return out


def run_random(model_dir: Path, spec: dict, args) -> dict:
    """The off-switch: random prompts at --random-concurrency, plain against ngram with the threshold."""
    c = args.random_concurrency
    prompts = random_prompts(model_dir, c, 256, args.seed)
    params = SamplingParams(max_tokens=16 if args.smoke else 128, temperature=0.0, ignore_eos=True)
    gated = {**spec, "disable_by_batch_size": args.disable_by_batch_size}
    plain = run_native(model_dir, prompts, c, None, args, params)
    ngram = run_native(model_dir, prompts, c, gated, args, params)
    plain.pop("outputs"), ngram.pop("outputs")
    return {
        "concurrency": c,
        "speculative_config": gated,
        "native": plain,
        "native_ngram": ngram,
        "ngram_vs_plain_tok_s": ngram["output_tok_s"] / plain["output_tok_s"],
    }


def summarize(done: list[dict], elapsed: float) -> dict:
    tokens = sum(len(r["tokens"]) for r in done)
    tpots = [(r["end"] - r["ttft"]) / (len(r["tokens"]) - 1) for r in done if len(r["tokens"]) > 1]
    return {
        "elapsed_s": elapsed,
        "output_tokens": tokens,
        "output_tok_s": tokens / elapsed,
        "tpot_ms": 1000 * sum(tpots) / len(tpots) if tpots else float("nan"),
    }


def run_vllm(model_dir: Path, prompts: list[list[int]], concurrency: int, spec: dict, args) -> dict:
    venv_python = ROOT / ".venv-vllm" / "bin" / "python"
    if not venv_python.exists():
        return {"error": ".venv-vllm not found (make venv-vllm)"}
    job = {
        "model": str(model_dir),
        "prompts": prompts,
        "max_tokens": args.max_tokens,
        "concurrency": concurrency,
        "speculative_config": spec,
        "threads": args.threads,
    }
    script = ROOT / "benchmarks" / "spec_decode_vllm.py"
    proc = subprocess.run(
        [str(venv_python), str(script)], input=json.dumps(job), capture_output=True, text=True, timeout=3600
    )
    for line in proc.stdout.splitlines():
        if line.startswith("glm-serve-result "):
            return json.loads(line.split(" ", 1)[1])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model dir (default: embedded SmolLM2)")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--passage-tokens", type=int, nargs=2, default=(200, 500))
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-speculative-tokens", type=int, default=3)
    p.add_argument("--prompt-lookup", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    p.add_argument("--random-concurrency", type=int, default=64, help="the off-switch run (0: skip it)")
    p.add_argument("--disable-by-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--attention-kernel", default="cpu", help="the native engine's kernel (configs/cpu.yaml's)"
    )
    p.add_argument(
        "--with-vllm", action="store_true", help="also run vLLM-CPU (plain and ngram) from .venv-vllm"
    )
    p.add_argument("--smoke", action="store_true", help="2 short requests, 16 tokens, concurrency 1 and 2")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.concurrency, args.max_tokens = 2, [1, 2], 16
        args.random_concurrency, args.disable_by_batch_size = 4, 2

    import torch

    from backends.loader import resolve_model_dir

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    prompts = make_prompts(model_dir, args)
    spec = {
        "method": "ngram",
        "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_min": args.prompt_lookup[0],
        "prompt_lookup_max": args.prompt_lookup[1],
    }
    results: dict = {
        "benchmark": "spec_decode",
        "machine": {"cpu": cpu_model(), "threads": args.threads},
        "backend": "native",
        "profile": "cpu",
        "model": model_dir.name,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "workload": {
            "num_requests": len(prompts),
            "prompt_tokens": [len(x) for x in prompts],
            "max_tokens": args.max_tokens,
            "speculative_config": spec,
        },
        "runs": {},
    }
    for c in args.concurrency:
        plain = run_native(model_dir, prompts, c, None, args)
        ngram = run_native(model_dir, prompts, c, spec, args)
        same = sum(a == b for a, b in zip(plain.pop("outputs"), ngram.pop("outputs"), strict=True))
        run = {"native": plain, "native_ngram": ngram, "outputs_identical": f"{same}/{len(prompts)}"}
        run["ngram_vs_plain_tok_s"] = ngram["output_tok_s"] / plain["output_tok_s"]
        run["plain_vs_ngram_tpot"] = plain["tpot_ms"] / ngram["tpot_ms"]
        if args.with_vllm:
            run["vllm_ngram"] = run_vllm(model_dir, prompts, c, spec, args)
            if "output_tok_s" in run["vllm_ngram"]:
                run["ngram_vs_vllm_ngram_tok_s"] = ngram["output_tok_s"] / run["vllm_ngram"]["output_tok_s"]
        results["runs"][str(c)] = run
    if args.random_concurrency:
        results["random"] = run_random(model_dir, spec, args)
    write(results, Path(args.out), smoke=args.smoke)
    return results


def table(results: dict) -> str:
    rows = ["| concurrency | run | output tok/s | TPOT ms | acceptance |", "|---|---|---|---|---|"]
    for c, run in results["runs"].items():
        for name in ("native", "native_ngram", "vllm_ngram"):
            r = run.get(name)
            if not r or "output_tok_s" not in r:
                continue
            rate = r.get("acceptance_rate")
            rows.append(
                f"| {c} | {name} | {r['output_tok_s']:.1f} | {r.get('tpot_ms', float('nan')):.1f} | "
                f"{'' if rate is None else f'{rate:.0%}'} |"
            )
        rows.append(
            f"| {c} | ngram vs plain | {run['ngram_vs_plain_tok_s']:.2f}x | plain/ngram {run['plain_vs_ngram_tpot']:.2f}x "
            f"| outputs identical {run['outputs_identical']} |"
        )
    r = results.get("random")
    if r:
        rows.append(
            f"| {r['concurrency']} random | ngram (off above {r['speculative_config']['disable_by_batch_size']}) "
            f"vs plain | {r['ngram_vs_plain_tok_s']:.2f}x | {r['native_ngram']['tpot_ms']:.1f} vs "
            f"{r['native']['tpot_ms']:.1f} | {r['native_ngram'].get('acceptance_rate', 0):.0%} |"
        )
    return "\n".join(rows)


def write(results: dict, out_dir: Path, smoke: bool) -> None:
    print(json.dumps(results, indent=2))
    print(table(results))
    if smoke:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"spec_decode_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
