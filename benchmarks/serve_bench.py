"""Serving benchmark (`glm-serve bench`): a load generator for any OpenAI-compatible endpoint, and the
suite runner that starts glm-serve (and vLLM's OpenAI server as a baseline) itself.

Suites (benchmarks/suites/<accelerator>.yaml):

    python benchmarks/serve_bench.py --suite cpu --baseline vllm     # ours vs vLLM's server, same run
    python benchmarks/serve_bench.py --suite cpu --quick             # the CI smoke subset (~2 min)
    python benchmarks/serve_bench.py --suite cpu --baseline http://host:8000 --api-key ...

Any running endpoint(s), vLLM `bench serve`-style flags:

    python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000 --dataset-name random \\
        --random-input-len 256 --random-output-len 128 --max-concurrency 1 4 16 --goodput ttft:2000

Results: <out>/<suite>/<timestamp>/ holds one JSON per server and load point (vLLM's field names, plus
label, engine_backend, profile, commit, machine), results.json, PNG plots and summary.md."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench.metrics import parse_goodput  # noqa: E402
from benchmarks.bench.servers import ServerSpec, glm_serve_spec, url_spec, vllm_available, vllm_spec  # noqa: E402
from benchmarks.bench.suite import Suite, SuiteError, Workload, load_suite  # noqa: E402
from benchmarks.bench.tiny_model import TINY_LLAMA, tiny_llama_dir  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm-serve bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", help="a suite name under benchmarks/suites/ or a YAML path")
    p.add_argument("--quick", action="store_true", help="the suite's quick subset (CI smoke)")
    p.add_argument(
        "--baseline", action="append", default=[], help="'vllm' (start vLLM's OpenAI server) or a URL"
    )
    p.add_argument("--model", help="model directory (default: the suite's; the embedded SmolLM2)")
    p.add_argument("--tokenizer", help="tokenizer directory for prompts (default: the model's)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="for URL endpoints")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results root (default benchmarks/results)")
    p.add_argument("--save-detailed", action="store_true", help="keep per-request lists in the JSON")
    p.add_argument("--note", help="a note recorded with every result (e.g. 'machine shared')")
    p.add_argument(
        "--update-results-md", action="store_true", help="write the run into benchmarks/RESULTS.md"
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--baseline-first", action="store_true", help="run the baselines before ours (order check)"
    )
    p.add_argument("--from-run", help="re-render a run directory's plots and summary (with its --suite)")
    g = p.add_argument_group("endpoint mode (no --suite): benchmark running servers")
    g.add_argument("--base-url", action="append", default=[], help="a running server; repeat for several")
    g.add_argument("--served-model", help="model name to request (default: the first /v1/models lists)")
    g.add_argument("--endpoint-api", choices=["completions", "chat"], default="completions")
    g.add_argument("--dataset-name", choices=["random", "sharegpt", "shared_prefix"], default="random")
    g.add_argument("--dataset-path", help="ShareGPT JSON file")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--random-input-len", type=int, default=256)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--prefix-len", type=int, default=1024)
    g.add_argument("--suffix-len", type=int, default=32)
    g.add_argument("--num-prefixes", type=int, default=1)
    g.add_argument("--max-concurrency", type=int, nargs="*", default=[], help="levels to sweep")
    g.add_argument(
        "--request-rate", type=float, nargs="*", default=[], help="rates (req/s) to sweep; inf: all at once"
    )
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1: Poisson")
    g.add_argument("--num-warmups", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--goodput", nargs="*", default=[], help="SLOs in ms, e.g. ttft:2000 tpot:200")
    g.add_argument("--metric-percentiles", default="50,90,99")
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM and glm-serve)")
    g.add_argument("--temperature", type=float, default=0.0)
    return p


def endpoint_suite(args: argparse.Namespace) -> Suite:
    rates = tuple(math.inf if math.isinf(r) else r for r in args.request_rate)
    workload = Workload(
        name=args.dataset_name,
        dataset=args.dataset_name,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        num_prefixes=args.num_prefixes,
        path=args.dataset_path,
        concurrency=tuple(args.max_concurrency) or (() if rates else (1,)),
        request_rate=rates,
        burstiness=args.burstiness,
        num_prompts=args.num_prompts,
        num_warmups=args.num_warmups,
        seed=args.seed,
    )
    return Suite(
        suite="endpoint",
        profile="external",
        api=args.endpoint_api,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        goodput=parse_goodput(args.goodput),
        percentiles=tuple(float(p) for p in args.metric_percentiles.split(",")),
        workloads=(workload,),
    )


def suite_servers(suite: Suite, args: argparse.Namespace, model: str, notes: list[str]) -> list[ServerSpec]:
    own_args = tuple(str(a) for a in suite.glm_serve.get("args", []))
    servers = [
        glm_serve_spec(suite.profile, Path(model) if args.model or suite.model else None, extra_args=own_args)
    ]
    for baseline in args.baseline:
        if baseline == "vllm":
            if not vllm_available():
                notes.append("vLLM baseline skipped: .venv-vllm not found (make venv-vllm)")
                print(f"NOTE: {notes[-1]}", flush=True)
                continue
            vllm = suite.vllm
            servers.append(
                vllm_spec(
                    Path(model),
                    [str(a) for a in vllm.get("args", [])],
                    {k: str(v) for k, v in (vllm.get("env") or {}).items()},
                )
            )
        else:
            servers.append(url_spec(baseline, api_key=args.api_key))
    return servers


def load_run_suite(args: argparse.Namespace, notes: list[str]) -> Suite | None:
    if args.suite:
        suite = load_suite(args.suite)
        if args.quick:
            notes.append("--quick: the suite's CI subset, too few requests for figures to quote")
            return suite.quick_subset()
        return suite
    if args.base_url:
        return endpoint_suite(args)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    from benchmarks.bench import runner

    notes: list[str] = []
    try:
        suite = load_run_suite(args, notes)
    except (SuiteError, ValueError) as exc:
        print(f"glm-serve bench: {exc}", file=sys.stderr)
        return 2
    if suite is None:
        print("glm-serve bench: give --suite NAME or --base-url URL", file=sys.stderr)
        return 2
    if args.from_run:
        return finish(runner.load_run(suite, Path(args.from_run)), args)
    model = args.model or suite.model
    if model == TINY_LLAMA:
        model = str(tiny_llama_dir())
    elif model is None or (args.suite is None and args.tokenizer is None):
        from backends.loader import resolve_model_dir

        model = str(resolve_model_dir(model))
    if args.suite:
        servers = suite_servers(suite, args, model, notes)
    else:
        servers = [url_spec(u, args.served_model, args.api_key) for u in args.base_url]
    run = runner.run_suite(
        suite, servers, Path(args.out), args.tokenizer or suite.tokenizer or model,
        detailed=args.save_detailed, note=args.note, notes=notes, baseline_first=args.baseline_first,
    )  # fmt: skip
    run.notes.append(f"wall time of the whole run: {(time.perf_counter() - t0) / 60:.1f} min")
    return finish(run, args)


def finish(run, args: argparse.Namespace) -> int:
    """Ratios, targets, plots, results.json, summary.md (and RESULTS.md) of a run; the exit status."""
    from benchmarks.bench import plots, report, runner

    suite = run.suite
    table = runner.ratios(run, ours=run.reference)
    checks = runner.check_targets(run, table)
    figures = []
    if not args.no_plots and run.results:
        try:
            figures = plots.plot_run(run.results, run.out_dir, suite.percentiles)
        except ImportError:
            run.notes.append("plots skipped: matplotlib is not installed (pip install matplotlib)")
            print(f"NOTE: {run.notes[-1]}", flush=True)
    record = {"results": run.results, "ratios": table, "targets": checks, "server_errors": run.server_errors}
    record.update(notes=run.notes, reference=run.reference)
    (run.out_dir / "results.json").write_text(json.dumps(record, indent=2))
    summary = report.summary_markdown(run, table, checks, figures)
    (run.out_dir / "summary.md").write_text(summary)
    if args.update_results_md:
        section = report.summary_markdown(
            run, table, checks, figures, figure_prefix=f"figures/{suite.suite}/"
        )
        report.update_results_md(RESULTS_MD, suite.suite, section, figures)
    print(summary)
    print(f"wrote {run.out_dir}")
    failed = sum(r["failed"] for r in run.results)
    if run.server_errors or failed or not run.results:
        print(
            f"glm-serve bench: {len(run.server_errors)} server(s) failed, {failed} request(s) failed",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
