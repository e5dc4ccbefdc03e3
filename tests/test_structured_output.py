"""Structured outputs in the native engine: the sampler's mask, matchers that follow accepted tokens,
preemption by recompute with constrained requests in flight, and the grammars of forced tool calls."""

from __future__ import annotations

import json
import re

import pytest
import torch

from server.scheduler.request import Request, SamplingParams
from server.structured_output import StructuredOutput, closed_schema, reasoning_prefixed_lark
from server.structured_output_matcher import GrammarMatchers, unpack_bitmask
from server.structured_output_tools import glm_tool_call_constraint, json_tool_call_constraint
from tests.engine_helpers import run_requests, start_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    from backends.loader import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(None))


def _chat(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


def test_unpack_bitmask_matches_bits():
    bitmask = torch.tensor([[0b101, -1], [-(1 << 31), 0]], dtype=torch.int32)
    allowed = unpack_bitmask(bitmask, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, *range(32, 40)]
    assert allowed[1].nonzero().flatten().tolist() == [31]


def test_matcher_follows_tokens_rebuilds_and_caches(smol):
    eos = frozenset({smol.eos_token_id})
    matchers = GrammarMatchers(smol, len(smol), eos)
    constraint = StructuredOutput("json", SCHEMA)
    assert matchers.compile(constraint) is None and matchers.compile(constraint) is None
    assert matchers.num_compiled == 1  # cached per grammar for this tokenizer
    req = Request("r", [1, 2], SamplingParams(structured=constraint))
    text = '{"name": "Ada", "n": 12'
    for token in smol.encode(text, add_special_tokens=False):
        allowed = matchers.fill_mask([req])[0]
        assert allowed[token], smol.decode(req.output_token_ids + [token])
        req.output_token_ids.append(token)
    assert not matchers.fill_mask([req])[0][smol.encode("x", add_special_tokens=False)[0]]
    matchers.drop("r")  # preemption: the next mask rebuilds the matcher from the accepted tokens
    again = matchers.fill_mask([req])[0]
    assert matchers.num_rebuilt == 1 and again[smol.encode("}", add_special_tokens=False)[0]]
    assert matchers.fill_mask([Request("u", [1], SamplingParams())]) is None  # nothing constrained


def test_constraint_starts_after_reasoning(smol):
    matchers = GrammarMatchers(smol, len(smol), frozenset({smol.eos_token_id}))
    constraint = StructuredOutput("regex", "[0-9]+", starts_after="</answer>")
    req = Request("r", [1], SamplingParams(structured=constraint))
    assert matchers.fill_mask([req]) is None  # free before the reasoning ends
    req.output_token_ids += smol.encode("thinking</answer>", add_special_tokens=False)
    allowed = matchers.fill_mask([req])[0]
    assert allowed[smol.encode("7", add_special_tokens=False)[0]]
    assert not allowed[smol.encode("a", add_special_tokens=False)[0]]


def test_constrained_requests_survive_preemption(smol):
    """A KV cache too small for all requests at once: constrained ones are preempted, recomputed, and still
    produce output their constraint accepts."""
    engine = start_engine(None, num_kv_blocks=10, block_size=16, max_num_seqs=6, max_num_batched_tokens=256)
    prompt = _chat(smol, "Give a JSON object.")
    long_name = {
        **SCHEMA,
        "properties": {**SCHEMA["properties"], "name": {"type": "string", "minLength": 40, "maxLength": 40}},
    }
    constrained = [
        SamplingParams(max_tokens=90, temperature=1.0, seed=i, structured=StructuredOutput("json", long_name))
        for i in range(4)
    ]
    regex = SamplingParams(
        max_tokens=40, temperature=1.0, seed=9, structured=StructuredOutput("regex", "[a-z]{30}")
    )
    results = run_requests(engine, [prompt] * 5, [*constrained, regex])
    assert engine.core.scheduler.num_preemptions_total > 0
    assert engine.core.runner.grammars.num_rebuilt > 0
    for result in results[:4]:
        value = json.loads(result["text"])
        assert set(value) == {"name", "n"} and 0 <= value["n"] <= 999 and len(value["name"]) == 40
    assert re.fullmatch("[a-z]{30}", results[4]["text"])
    assert not engine.core.runner.grammars._states  # released when the requests finished


@pytest.mark.usefixtures("core_mode")
def test_logit_bias_and_min_tokens_with_a_grammar(smol):
    engine = start_engine(None, kv_cache_bytes=32 << 20)
    prompt = _chat(smol, "Pick.")
    choice = StructuredOutput("choice", ["yes", "no"])
    yes = smol.encode("yes", add_special_tokens=False)[0]
    params = [
        SamplingParams(max_tokens=5, temperature=1.0, seed=1, structured=choice, logit_bias={yes: -100.0}),
        SamplingParams(max_tokens=5, temperature=1.0, seed=1, structured=choice, min_tokens=3),
    ]
    biased, at_least = run_requests(engine, [prompt] * 2, params)
    assert biased["text"] == "no"
    assert at_least["text"] in ("yes", "no")  # min_tokens cannot stretch a finished grammar


def test_tool_call_grammars_accept_their_calls(smol):
    import llguidance
    import llguidance.hf

    from server.structured_output import llguidance_grammar

    ll = llguidance.hf.from_tokenizer(smol, n_vocab=len(smol))
    functions = [
        {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                                     "required": ["a"]}},
        {"name": "g"},
    ]  # fmt: skip
    cases = [
        (glm_tool_call_constraint(functions, single=False, fmt="glm47"),
         "<tool_call>f<arg_key>a</arg_key><arg_value>x y</arg_value><arg_key>b</arg_key><arg_value>3</arg_value>"
         "</tool_call><tool_call>g</tool_call>", True),
        (glm_tool_call_constraint(functions, single=True, fmt="glm47"), "<tool_call>g</tool_call><tool_call>g", False),
        (glm_tool_call_constraint(functions, single=True, fmt="glm45"),
         "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>x</arg_value>\n</tool_call>", True),
        (json_tool_call_constraint(functions, named=False, single=True), '[{"name": "g", "parameters": {}}]', True),
        (json_tool_call_constraint(functions[:1], named=True, single=True), '{"a": "x", "b": 2}', True),
        (json_tool_call_constraint(functions[:1], named=True, single=True), '{"b": 2}', False),
    ]  # fmt: skip
    for constraint, text, valid in cases:
        matcher = llguidance.LLMatcher(ll, llguidance_grammar(constraint), log_level=0)
        ok = matcher.consume_tokens(smol.encode(text, add_special_tokens=False)) and matcher.is_accepting()
        assert ok is valid, (constraint.value, text, matcher.get_error())


def test_reasoning_prefixed_lark_for_vllm(smol):
    import llguidance
    import llguidance.hf

    ll = llguidance.hf.from_tokenizer(smol, n_vocab=len(smol))
    constraint = StructuredOutput("json", SCHEMA, starts_after="</answer>")
    grammar = reasoning_prefixed_lark(constraint, think_close_is_token=False)
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert matcher.consume_tokens(
        smol.encode('Hmm, ok.</answer>{"name": "A", "n": 1}', add_special_tokens=False)
    )
    assert matcher.is_accepting()
    assert reasoning_prefixed_lark(StructuredOutput("json", SCHEMA), think_close_is_token=False) is None


def test_closed_schema_closes_declared_objects_as_vllms_strict_xgrammar_does():
    schema = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        "$defs": {"Open": {"type": "object", "properties": {}, "additionalProperties": True}},
    }
    closed = closed_schema(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["$defs"]["Open"]["additionalProperties"] is True  # what the schema says stays
    assert "additionalProperties" not in schema  # the caller's schema is not changed
    assert closed_schema({"type": "object"}) == {"type": "object"}  # json_object stays any object
