"""From request fields to SamplingParams, with the cross-field rules a pydantic field cannot state.
The engine applies what the params say (stop strings, stop token ids, penalties, logit_bias, the
structured-output constraint); this module only maps."""

from __future__ import annotations

from typing import Any

from server.errors import bad_request
from server.generation_defaults import NO_DEFAULTS, SamplingDefaults
from server.protocol import SamplingRequest
from server.scheduler.request import SamplingParams
from server.structured_output import StructuredOutput, from_extras


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in stops):
        raise bad_request("Stop strings must not be empty.", param="stop")
    return stops


def check_common_fields(body: SamplingRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    if any(t < 0 for t in body.stop_token_ids or []):
        raise bad_request("Token ids in 'stop_token_ids' must be non-negative.", param="stop_token_ids")
    stop_strings(body.stop)
    if body.prompt_logprobs is not None:
        raise bad_request("'prompt_logprobs' is not supported by this server.", param="prompt_logprobs")


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias: token ids (as JSON object keys) to biases in [-100, 100]."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if token_id < 0:
            raise bad_request(f"logit_bias key '{key}' is not a token id.", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise bad_request(f"logit_bias value {value} is outside [-100, 100].", param="logit_bias")
        out[token_id] = value
    return out


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, prompt_param: str, default: int | None = None
) -> int:
    """The output budget: what was asked for, or by default the model's max_new_tokens (`default`) within
    the context the prompt leaves, else all of that context."""
    if prompt_len == 0:
        raise bad_request("The prompt is empty.", param=prompt_param)
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion. Please shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return min(default, max_model_len - prompt_len) if default else max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            "Please reduce the prompt or the completion length.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def to_sampling_params(
    body: SamplingRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    defaults: SamplingDefaults = NO_DEFAULTS,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    """Fields the request leaves unset take the model's defaults (generation_config.json), then the API's.
    `structured`: the constraint the route resolved (chat: server/routes/chat_constraints.py); by default
    the body's structured_outputs / guided_* fields (text completions)."""
    if body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({body.min_tokens}) is larger than the completion budget ({max_tokens}).",
            param="min_tokens",
        )
    top_k = _first(body.top_k, defaults.top_k, 0)
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        temperature=_first(body.temperature, defaults.temperature, 1.0),
        top_p=_first(body.top_p, defaults.top_p, 1.0),
        top_k=0 if top_k < 0 else top_k,
        min_p=_first(body.min_p, defaults.min_p, 0.0),
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=_first(body.repetition_penalty, defaults.repetition_penalty, 1.0),
        stop=stop_strings(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        logit_bias=logit_bias(body.logit_bias),
        structured=structured if structured is not None else _extras_constraint(body),
    )


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _extras_constraint(body: SamplingRequest) -> StructuredOutput | None:
    found = from_extras(body)
    return found[1] if found is not None else None
