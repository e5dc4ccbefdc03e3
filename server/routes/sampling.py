"""From request fields to SamplingParams, with the cross-field rules a pydantic field cannot state.
The engine applies what the params say (stop strings, stop token ids, penalties); this module only maps."""

from __future__ import annotations

from server.errors import bad_request
from server.protocol import SamplingRequest
from server.scheduler.request import SamplingParams


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


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, prompt_param: str) -> int:
    """The output budget: what was asked for, or by default all of the context the prompt leaves."""
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
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            "Please reduce the prompt or the completion length.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def to_sampling_params(body: SamplingRequest, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
    if body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({body.min_tokens}) is larger than the completion budget ({max_tokens}).",
            param="min_tokens",
        )
    top_k = body.top_k if body.top_k is not None else 0
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k < 0 else top_k,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        stop=stop_strings(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
    )
