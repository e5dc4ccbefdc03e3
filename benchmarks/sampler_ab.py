"""The sampler of another checkout against this one, in one process, on the same batches, calls alternating:
a same-run ratio for the sample phase of benchmarks/step_profile.py when the host is too noisy for two
separate runs to compare.

Batches: benchmarks/step_profile.py's "greedy" and "mixed" sampling (128 and 64 requests, prompts of 128
tokens, 60 output tokens each), logits of N(0, 3^2) over SmolLM2's vocabulary (49152), on the CPU. The
baseline gets its logits the way its runner gave them (`.cpu()`, a no-op here). Reports the median of the
calls after two warm-up rounds.

    git archive <ref> | tar -x -C /tmp/baseline
    python benchmarks/sampler_ab.py --baseline /tmp/baseline [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.sampler import Sampler  # noqa: E402
from benchmarks.step_profile import sampling_params  # noqa: E402
from server.scheduler.request import Request  # noqa: E402

VOCAB = 49152
BATCHES = [("greedy", 128), ("mixed", 128), ("mixed", 64)]


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def baseline_sampler(root: Path) -> type:
    """The baseline's Sampler class, loaded beside ours: its module and its rejection module (the one
    module it imports whose API changed) under other names."""
    ours = sys.modules["backends.spec_decode.rejection"]
    sys.modules["backends.spec_decode.rejection"] = load_module(
        "baseline_rejection", root / "backends" / "spec_decode" / "rejection.py"
    )
    try:
        return load_module("baseline_sampler", root / "backends" / "sampler.py").Sampler
    finally:
        sys.modules["backends.spec_decode.rejection"] = ours


def batch(kind: str, size: int) -> list[Request]:
    reqs = []
    for i in range(size):
        req = Request(f"r{i}", list(range(100, 228)), sampling_params(i, kind, 300), frozenset({2}))
        req.output_token_ids = [(7 * i + 13 * j) % VOCAB for j in range(60)]
        reqs.append(req)
    return reqs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="root of the other checkout (e.g. a git archive)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    Baseline = baseline_sampler(Path(args.baseline))
    results = {}
    print("| batch | baseline ms | this ms | this / baseline |\n|---|---|---|---|")
    for kind, size in BATCHES:
        reqs = batch(kind, size)
        logits = torch.randn(size, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
        samplers = {"baseline": Baseline(VOCAB), "this": Sampler(VOCAB)}
        times: dict[str, list[float]] = {name: [] for name in samplers}
        for _ in range(args.rounds):
            for name, sampler in samplers.items():
                started = time.perf_counter()
                sampler(logits.cpu() if name == "baseline" else logits, reqs)
                times[name].append(time.perf_counter() - started)
        ms = {name: 1e3 * statistics.median(t[2:]) for name, t in times.items()}
        results[f"{kind}-b{size}"] = {**ms, "this_vs_baseline": ms["this"] / ms["baseline"]}
        print(
            f"| {kind} b{size} | {ms['baseline']:.1f} | {ms['this']:.1f} | {ms['this'] / ms['baseline']:.2f}x |"
        )
    return results


if __name__ == "__main__":
    main()
