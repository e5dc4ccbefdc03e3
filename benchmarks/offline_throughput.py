"""Offline throughput: the native engine against transformers' generate (static batches) and, with
--with-vllm, vLLM-CPU offline, on the same requests in one run.

Workload (defaults): 64 requests, prompt lengths uniform in 16..512 tokens, output lengths uniform in
16..256 (EOS ignored), fixed seed, SmolLM2-135M fp32. Writes JSON under benchmarks/results/ and appends a
line to benchmarks/RESULTS.md.

    python benchmarks/offline_throughput.py [--num-requests 64] [--threads 2] [--with-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.config import EngineConfig  # noqa: E402
from server.engine import NativeEngine  # noqa: E402
from server.engine_api import GenerateRequest  # noqa: E402
from server.scheduler.request import SamplingParams  # noqa: E402


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int
):
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(n)])


def run_native(model_dir: Path, work: Workload, args) -> dict:
    cfg = EngineConfig(
        model=str(model_dir),
        num_threads=args.threads,
        kv_cache_bytes=2 << 30,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_kernel=args.attention_kernel,
    )
    engine = NativeEngine(cfg)
    engine.load_model()

    async def main():
        await engine.start()

        async def one(i):
            params = SamplingParams(max_tokens=work.output_lens[i], temperature=0.0, ignore_eos=True)
            n = 0
            async for d in engine.generate(GenerateRequest(f"b{i}", work.prompts[i], params)):
                n = d.num_output_tokens
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(len(work.prompts))))
        elapsed = time.perf_counter() - t0
        await engine.shutdown()
        return counts, elapsed

    counts, elapsed = asyncio.run(main())
    assert counts == work.output_lens, "native engine produced the wrong number of tokens"
    return {
        "elapsed_s": elapsed,
        "output_tokens": sum(counts),
        "preemptions": engine.stats()["num_preemptions_total"],
    }


@torch.inference_mode()
def run_transformers(model_dir: Path, work: Workload, batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    for start in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[start : start + batch_size]
        max_new = max(work.output_lens[start : start + batch_size])
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - t0
    # Only each request's own output length counts: static batches pay for the longest one.
    return {"elapsed_s": elapsed, "output_tokens": work.output_tokens, "batch_size": batch_size}


def run_vllm(model_dir: Path, work: Workload, args) -> dict | None:
    venv_python = ROOT / ".venv-vllm" / "bin" / "python"
    if not venv_python.exists():
        return None
    payload = json.dumps({"model": str(model_dir), "prompts": work.prompts, "output_lens": work.output_lens})
    script = ROOT / "benchmarks" / "vllm_offline.py"
    proc = subprocess.run(
        [str(venv_python), str(script)], input=payload, capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    for line in proc.stdout.splitlines():
        if line.startswith("glm-serve-result "):
            return json.loads(line.split(" ", 1)[1])
    return {"error": "no result line in vLLM's output: " + proc.stdout[-1000:]}


def gemm_gflops(threads: int, n: int = 1024, repeat: int = 10) -> dict[str, float]:
    """fp32 GFLOP/s of an n x n x n matmul through MKL (torch.matmul) and through oneDNN with a pre-packed
    weight (the engine's linear layers, glm_kernels/cpu_linear.py)."""
    from glm_kernels import cpu_linear

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    runs = {"mkl": lambda: a @ b}
    if cpu_linear.available():
        packed = cpu_linear.pack(b)
        runs["onednn"] = lambda: cpu_linear.linear(a, packed)
    out = {}
    for name, fn in runs.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        out[name] = 2 * n**3 * repeat / (time.perf_counter() - t0) / 1e9
    return out


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model dir (default: embedded SmolLM2)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument(
        "--attention-kernel", default="cpu", help="the native engine's kernel (configs/cpu.yaml's)"
    )
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--with-vllm", action="store_true", help="also run vLLM-CPU offline from .venv-vllm")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from backends.loader import resolve_model_dir

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    work = make_workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len), vocab, args.seed)
    params = _param_count(model_dir)
    gemm = gemm_gflops(args.threads)
    peak = max(gemm.values())

    results: dict = {
        "benchmark": "offline_throughput",
        "machine": {"cpu": cpu_model(), "threads": args.threads, "platform": platform.platform()},
        "backend": "native",
        "profile": "cpu",
        "attention_kernel": args.attention_kernel,
        "model": model_dir.name,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "workload": {
            "num_requests": args.num_requests,
            "prompt_len": list(args.prompt_len),
            "output_len": list(args.output_len),
            "seed": args.seed,
            "prompt_tokens": work.prompt_tokens,
            "output_tokens": work.output_tokens,
        },
        "gemm_fp32_gflops": peak,  # the faster of the two below: the roofline the engine is held to
        "gemm_fp32_gflops_by_library": gemm,
    }
    native = run_native(model_dir, work, args)
    native["output_tok_s"] = native["output_tokens"] / native["elapsed_s"]
    achieved = 2 * params * (work.prompt_tokens + work.output_tokens) / native["elapsed_s"] / 1e9
    native["achieved_gflops"] = achieved
    native["roofline_fraction"] = achieved / peak
    results["native"] = native
    if not args.skip_transformers:
        hf = run_transformers(model_dir, work, args.hf_batch_size)
        hf["output_tok_s"] = hf["output_tokens"] / hf["elapsed_s"]
        results["transformers"] = hf
        results["native_vs_transformers"] = native["output_tok_s"] / hf["output_tok_s"]
    if args.with_vllm:
        vllm = run_vllm(model_dir, work, args)
        results["vllm"] = vllm if vllm is not None else {"error": ".venv-vllm not found (make venv-vllm)"}
        if vllm and "output_tok_s" in vllm:
            results["native_vs_vllm"] = native["output_tok_s"] / vllm["output_tok_s"]
    _write(results, Path(args.out))
    return results


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    return total


RUN_LOG = "### Offline throughput run log (one line per run of benchmarks/offline_throughput.py)"


def _write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"offline_throughput_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    n = results["native"]
    line = (
        f"| {results['time']} | {results['commit']} | {results['machine']['cpu']} x{results['machine']['threads']} | "
        f"{results['workload']['num_requests']} req | native {n['output_tok_s']:.1f} tok/s | "
        f"transformers {results.get('transformers', {}).get('output_tok_s', float('nan')):.1f} tok/s | "
        f"vLLM {results.get('vllm', {}).get('output_tok_s', float('nan')) if results.get('vllm') else float('nan'):.1f} tok/s | "
        f"native/HF {results.get('native_vs_transformers', float('nan')):.2f}x | "
        f"native/vLLM {results.get('native_vs_vllm', float('nan')):.2f}x | "
        f"roofline {n['roofline_fraction']:.1%} of {results['gemm_fp32_gflops']:.0f} GFLOP/s |\n"
    )
    md = ROOT / "benchmarks" / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Benchmark results\n"
    if RUN_LOG not in text:  # the log is the file's last section: each run appends its line
        text = text.rstrip("\n") + f"\n\n{RUN_LOG}\n\n"
    md.write_text(text + line)
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
