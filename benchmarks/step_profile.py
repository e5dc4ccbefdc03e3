"""Profile of the native engine's decode step: host time per phase and bytes copied device -> host per step.

Workload per run: `batch` requests of random prompts (prompt_len +- 8 tokens), ignore_eos and max_tokens past
the end of the run, so that after the prefill every request decodes one token per step. Only full decode
steps (every request scheduled, one token each) count: `warmup` of them are dropped, the next `steps` are
timed, the `count_steps` after them count transfers. Runs (defaults):

- tiny-greedy-b128, tiny-mixed-b128: backends/models/tiny.py's write_tiny_llama (2 layers of width 64,
  SmolLM2's vocabulary of 49152): its forward is cheap, so the engine's host work dominates a step, as it
  does for GLM-5 on an accelerator.
- smollm2-mixed-b64: SmolLM2-135M (the embedded default), for scale.

"mixed" sampling, by request index i mod 4: 0 greedy; 1 temperature 0.8, top_p 0.95, logprobs 2; 2 temperature
0.7, top_k 40, seed i; 3 temperature 1.0, min_p 0.05, presence 0.3, frequency 0.2, repetition 1.1,
logit_bias. "greedy": every request greedy.

Phases (host time, exclusive: a phase's time excludes the phases it calls), timed by wrapping the engine's
parts from outside; means over the timed steps:
  schedule  Scheduler.schedule and the engine's bookkeeping of scheduled requests
  prepare   step_inputs and the runner's input tensors and attention metadata (run_step minus forward)
  forward   the model's forward and compute_logits
  sample    the rest of TorchModelRunner.execute: logits -> sampler -> token ids on the host
  update    Scheduler.update_from_output and drafting
  output    the rest of EngineCore.step: the per-request output messages (detokenizing moved to the
            HTTP process's output processor, not timed here)
On a CPU every op runs synchronously, so host time is also the time of the work. On an accelerator the host
runs ahead of the device, and a phase that waits for it (the sampler's transfer) carries the device's time.

Bytes device -> host: on a CPU "device" and host are the same memory and nothing is copied, so the script
counts what would cross on an accelerator: every tensor that the step's code moves or converts to Python
(.cpu(), .numpy(), .tolist(), .item(), int() / float() / bool() / an index of a tensor), sized as
numel * element size, by phase (a torch function mode in the engine thread, in separate steps after the
timed ones: the mode costs host time). A conversion of a tensor that .cpu() returned (the same storage)
is not counted again. A conversion of a tensor computed from host data counts too, so the figure is an
upper bound: the code before sampling moved to the device copied the whole logits with .cpu() and then
read small host tensors, which count here although they never crossed.

    python benchmarks/step_profile.py [--threads 2] [--label before] [--compare results/step_profile-before.json]
    python benchmarks/step_profile.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import backends.torch_runner as torch_runner  # noqa: E402
import server.engine_core as engine_module  # noqa: E402
from benchmarks.offline_throughput import cpu_model, git_commit  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine import NativeEngine  # noqa: E402
from server.engine_api import GenerateRequest  # noqa: E402
from server.scheduler.request import SamplingParams  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "sample", "update", "output")
TO_HOST = {"cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__", "__index__"}


@dataclass(slots=True)
class RunSpec:
    name: str
    model: str  # "tiny" or "smollm2"
    batch: int
    prompt_len: int
    sampling: str  # "greedy" or "mixed"
    warmup: int
    steps: int
    count_steps: int


RUNS = [
    RunSpec("tiny-greedy-b128", "tiny", 128, 128, "greedy", 10, 100, 3),
    RunSpec("tiny-mixed-b128", "tiny", 128, 128, "mixed", 10, 100, 3),
    RunSpec("smollm2-mixed-b64", "smollm2", 64, 128, "mixed", 5, 30, 2),
]
SMOKE = [RunSpec("tiny-mixed-b8", "tiny", 8, 16, "mixed", 2, 4, 1)]


def sampling_params(i: int, sampling: str, max_tokens: int) -> SamplingParams:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    kind = i % 4 if sampling == "mixed" else 0
    if kind == 1:
        params.temperature, params.top_p, params.logprobs = 0.8, 0.95, 2
    elif kind == 2:
        params.temperature, params.top_k, params.seed = 0.7, 40, i
    elif kind == 3:
        params.temperature, params.min_p = 1.0, 0.05
        params.presence_penalty, params.frequency_penalty, params.repetition_penalty = 0.3, 0.2, 1.1
        params.logit_bias = {100 + i: 2.0, 200 + i: -2.0}
    return params


class HostTransfers(TorchFunctionMode):
    """Counts the tensors that code run under it moves or converts to the host, by `phase()`."""

    def __init__(self, phase: Callable[[], str]):
        super().__init__()
        self.phase = phase
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.largest = 0  # the most elements of one transfer
        self._on_host: set[int] = set()  # storages that .cpu() returned

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in TO_HOST and args and isinstance(args[0], torch.Tensor):
            tensor = args[0]
            storage = tensor.untyped_storage().data_ptr()
            if storage not in self._on_host:
                phase = self.phase()
                self.bytes[phase] += tensor.numel() * tensor.element_size()
                self.calls[phase] += 1
                self.largest = max(self.largest, tensor.numel())
            if name == "cpu":
                self._on_host.add(result.untyped_storage().data_ptr())
        return result


class PhaseTimer:
    """Exclusive host time per phase of the wrapped callables, and per step."""

    def __init__(self):
        self._stack: list[list] = []  # [phase, time spent in wrapped callees]
        self.current: dict[str, float] = defaultdict(float)

    def phase(self) -> str:
        return self._stack[-1][0] if self._stack else "output"

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            frame = [phase, 0.0]
            self._stack.append(frame)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self._stack.pop()
                self.current[phase] += elapsed - frame[1]
                if self._stack:
                    self._stack[-1][1] += elapsed

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        step, self.current = dict(self.current), defaultdict(float)
        return step


class StepRecorder:
    """Wraps one engine's parts; keeps the phase times of the timed full decode steps and the transfers of
    the counted ones, then sets `done`."""

    def __init__(self, engine: NativeEngine, spec: RunSpec, done: Callable[[], None]):
        self.spec = spec
        self.timer = PhaseTimer()
        self.done = done
        self.decode_steps = 0
        self.timed: list[dict[str, float]] = []
        self.transfers: list[HostTransfers] = []
        self.last_out = None
        runner, scheduler = engine.core.runner, engine.core.scheduler
        original_schedule = scheduler.schedule

        def schedule():
            self.last_out = original_schedule()
            return self.last_out

        scheduler.schedule = schedule
        self.timer.wrap(scheduler, "schedule", "schedule")
        self.timer.wrap(engine.core, "_mark_scheduled", "schedule")
        self.timer.wrap(torch_runner, "step_inputs", "prepare")
        self.timer.wrap(runner, "run_step", "prepare")
        self.timer.wrap(runner.model, "forward", "forward")
        self.timer.wrap(runner.model, "compute_logits", "forward")
        self.timer.wrap(runner, "execute", "sample")
        self.timer.wrap(scheduler, "update_from_output", "update")
        self.timer.wrap(engine_module, "propose_drafts", "update")
        self.timer.wrap(engine.core, "step", "output")
        timed_step = engine.core.step

        def step():
            counting = self.decode_steps >= spec.warmup + spec.steps
            transfers = HostTransfers(self.timer.phase) if counting else None
            if transfers is not None:
                with transfers:
                    outputs = timed_step()
            else:
                outputs = timed_step()
            self._record(self.timer.take(), transfers)
            return outputs

        engine.core.step = step

    def _record(self, times: dict[str, float], transfers: HostTransfers | None) -> None:
        out = self.last_out
        full_decode = len(out.scheduled) == self.spec.batch and all(
            s.num_new_tokens == 1 and s.sample for s in out.scheduled
        )
        if not full_decode:
            return
        self.decode_steps += 1
        if transfers is not None:
            self.transfers.append(transfers)
        elif self.decode_steps > self.spec.warmup:
            self.timed.append(times)
        if len(self.transfers) == self.spec.count_steps:
            self.done()

    def summary(self) -> dict:
        phases_ms = {p: 1e3 * statistics.fmean(t.get(p, 0.0) for t in self.timed) for p in PHASES}
        totals = [1e3 * sum(t.values()) for t in self.timed]
        n = len(self.transfers)
        d2h = {p: sum(t.bytes.get(p, 0) for t in self.transfers) / n for p in PHASES}
        calls = {p: sum(t.calls.get(p, 0) for t in self.transfers) / n for p in PHASES}
        return {
            "spec": asdict(self.spec),
            "timed_steps": len(self.timed),
            "phases_ms": phases_ms,
            "step_ms": statistics.fmean(totals),
            "step_ms_p50": statistics.median(totals),
            "tokens_per_s": self.spec.batch / statistics.fmean(totals) * 1e3,
            "d2h_bytes_per_step": sum(d2h.values()),
            "d2h_bytes_by_phase": d2h,
            "d2h_calls_by_phase": calls,
            "largest_transfer_elements": max(t.largest for t in self.transfers),
        }


def model_dir(name: str, scratch: Path) -> Path:
    from backends.loader import resolve_model_dir
    from backends.models.tiny import write_tiny_llama

    smollm = resolve_model_dir(None)
    if name == "smollm2":
        return smollm
    path = scratch / "tiny-llama"
    return path if path.exists() else write_tiny_llama(path, smollm)


def profile(spec: RunSpec, path: Path, args) -> dict:
    decode_steps = spec.warmup + spec.steps + spec.count_steps
    max_tokens = decode_steps + spec.batch * (spec.prompt_len + 8) // args.max_num_batched_tokens + 16
    blocks_per_request = (spec.prompt_len + 8 + max_tokens) // 16 + 2
    cfg = EngineConfig(
        model=str(path),
        num_threads=args.threads,
        num_kv_blocks=spec.batch * blocks_per_request + 16,
        max_num_seqs=spec.batch,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_kernel=args.attention_kernel,
        core_process=False,  # the profile times the core's step from inside: the core runs in a thread
    )
    engine = NativeEngine(cfg)
    engine.load_model()
    vocab = engine.core.runner.hf_config.vocab_size
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, vocab) for _ in range(spec.prompt_len + rng.randint(-8, 8))]
        for _ in range(spec.batch)
    ]

    async def main() -> dict:
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        recorder = StepRecorder(engine, spec, lambda: loop.call_soon_threadsafe(finished.set))
        await engine.start()

        async def consume(i: int) -> None:
            params = sampling_params(i, spec.sampling, max_tokens)
            async for _ in engine.generate(GenerateRequest(f"p{i}", prompts[i], params)):
                pass

        tasks = [asyncio.create_task(consume(i)) for i in range(spec.batch)]
        started = time.perf_counter()
        await finished.wait()
        wall = time.perf_counter() - started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.shutdown()
        return {**recorder.summary(), "wall_s": wall, "vocab_size": vocab, "model": path.name}

    return asyncio.run(main())


def table(results: dict) -> str:
    head = "| run | " + " | ".join(PHASES) + " | step ms | tok/s | D2H bytes/step |"
    lines = [head, "|" + "---|" * (len(PHASES) + 4)]
    for name, run in results["runs"].items():
        phases = " | ".join(f"{run['phases_ms'][p]:.2f}" for p in PHASES)
        lines.append(
            f"| {name} | {phases} | {run['step_ms']:.2f} | {run['tokens_per_s']:.0f} | "
            f"{run['d2h_bytes_per_step']:,.0f} |"
        )
    return "\n".join(lines)


def ratio_table(after: dict, before: dict) -> str:
    """after / before per phase, step time and bytes (below 1: the after-run is faster / copies less)."""
    head = "| run (after / before) | " + " | ".join(PHASES) + " | step | tok/s | D2H bytes |"
    lines = [head, "|" + "---|" * (len(PHASES) + 4)]
    for name, run in after["runs"].items():
        old = before["runs"].get(name)
        if old is None:
            continue
        cells = [_ratio(run["phases_ms"][p], old["phases_ms"][p]) for p in PHASES]
        cells += [_ratio(run["step_ms"], old["step_ms"]), _ratio(run["tokens_per_s"], old["tokens_per_s"])]
        cells.append(_ratio(run["d2h_bytes_per_step"], old["d2h_bytes_per_step"], digits=4))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(new: float, old: float, digits: int = 2) -> str:
    return f"{new / old:.{digits}f}x" if old else "n/a"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--attention-kernel", default="cpu", help="the native engine's kernel (configs/cpu.yaml's)"
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--runs", nargs="*", help="names of the runs to do (default: all)")
    p.add_argument("--label", default="run", help="names the JSON file: step_profile-<label>.json")
    p.add_argument("--compare", help="a previous run's JSON: also print after / before ratios")
    p.add_argument("--smoke", action="store_true", help="one small run, no JSON (tests)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    specs = SMOKE if args.smoke else [s for s in RUNS if not args.runs or s.name in args.runs]
    results: dict = {
        "benchmark": "step_profile",
        "label": args.label,
        "machine": {"cpu": cpu_model(), "threads": args.threads},
        "backend": "native",
        "profile": "cpu",
        "attention_kernel": args.attention_kernel,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        for spec in specs:
            results["runs"][spec.name] = profile(spec, model_dir(spec.model, Path(scratch)), args)
            print(f"{spec.name}: {results['runs'][spec.name]['step_ms']:.2f} ms/step", flush=True)
    print(table(results))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        results["compare"] = {"before": args.compare, "before_commit": before.get("commit")}
        print(ratio_table(results, before))
    if not args.smoke:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_profile-{args.label}.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
