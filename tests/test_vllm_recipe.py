"""vLLM command lines given to `glm-serve serve` build the engine arguments `vllm serve` builds: compared
field by field with vLLM's own argument parser and AsyncEngineArgs (runs where vLLM is installed:
make test-vllm). GLM-5's weights cannot exist here, so the EngineArgs objects are compared, not engines."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("vllm")

from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

from backends.vllm_args import engine_args  # noqa: E402
from server.cli import parse_args  # noqa: E402
from server.cli_flags import config_from_args  # noqa: E402

# vLLM's GLM-5 recipe, "Serving FP8 Model on 8xH200 (or H20) GPUs (141GB x 8)", with MTP as the recipes
# pass it (https://docs.vllm.ai/projects/recipes/en/stable/GLM/GLM5.html).
GLM5_RECIPE = (
    "zai-org/GLM-5-FP8 --tensor-parallel-size 8 --speculative-config.method mtp "
    "--speculative-config.num_speculative_tokens 3 --tool-call-parser glm47 --reasoning-parser glm45 "
    "--enable-auto-tool-choice --served-model-name glm-5-fp8"
).split()
# Every other vLLM flag glm-serve names, plus two it does not (passed through as vllm.*).
MANY_FLAGS = (
    "some/model -tp 2 -pp 2 -dp 2 --enable-expert-parallel --max-model-len 32k --max-num-seqs 8 "
    "--max-num-batched-tokens 4096 --gpu-memory-utilization 0.8 --kv-cache-dtype fp8_ds_mla "
    "--no-enable-prefix-caching --quantization fp8 --enforce-eager --trust-remote-code --generation-config vllm "
    "--served-model-name a b --seed 3 --block-size 64 --max-logprobs 7 --disable-custom-all-reduce "
    '--speculative-config {"method":"ngram","num_speculative_tokens":3,"prompt_lookup_max":4}'
).split()


def vllm_serve(argv: list[str]):
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    if args.model_tag is not None:  # as `vllm serve` does (vllm/entrypoints/cli/serve.py)
        args.model = args.model_tag
    return args, AsyncEngineArgs.from_cli_args(args)


def glm_serve(argv: list[str]):
    args, extra = parse_args(["serve", "--config", "nvidia-h200", *argv])
    cfg = config_from_args(args, extra)
    names = [cfg.server.served_model_name, *cfg.server.served_model_aliases]
    kwargs = engine_args(
        cfg.engine, cfg.extra.get("vllm", {}), cfg.engine.model, names, cfg.server.reasoning_parser
    )
    return cfg, AsyncEngineArgs(**kwargs)


def fields_set_by_flags(argv: list[str]) -> list[str]:
    """The EngineArgs fields the flags change in vLLM's own parse (against the bare model argument)."""
    _, bare = vllm_serve(argv[:1])
    _, full = vllm_serve(argv)
    return [
        f.name for f in dataclasses.fields(AsyncEngineArgs) if getattr(bare, f.name) != getattr(full, f.name)
    ]


@pytest.mark.parametrize("argv", [GLM5_RECIPE, MANY_FLAGS], ids=["glm5-recipe", "many-flags"])
def test_same_engine_args_as_vllm_serve(argv):
    vllm_args, theirs = vllm_serve(argv)
    cfg, ours = glm_serve(argv)
    changed = fields_set_by_flags(argv)
    assert (
        len(changed) >= 4
    )  # tensor_parallel_size, speculative_config, served_model_name, reasoning_parser, ...
    for name in [*changed, "model"]:
        assert getattr(ours, name) == getattr(theirs, name), name
    if "--tool-call-parser" in argv:  # front-end flags (not EngineArgs): our server's parser settings
        assert cfg.server.tool_call_parser == vllm_args.tool_call_parser
        assert cfg.server.enable_auto_tool_choice is vllm_args.enable_auto_tool_choice is True


def test_the_recipe_sets_what_the_profile_says():
    cfg, ours = glm_serve(GLM5_RECIPE)
    assert ours.speculative_config == {"method": "mtp", "num_speculative_tokens": 3}
    assert (ours.tensor_parallel_size, ours.served_model_name, ours.reasoning_parser) == (
        8,
        ["glm-5-fp8"],
        "glm45",
    )
    assert cfg.sources["vllm.speculative_config"] == "--speculative-config"
    assert cfg.sources["engine.model"] == "MODEL argument"


def test_a_mistyped_engine_arg_names_the_closest_vllm_field():
    from server.config import ConfigError

    with pytest.raises(ConfigError, match="unknown vLLM engine argument 'vllm.max_logprob' .*'max_logprobs'"):
        glm_serve(["some/model", "--max-logprob", "3"])
