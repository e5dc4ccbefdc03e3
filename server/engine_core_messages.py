"""What crosses between the HTTP process and the engine core: plain msgspec structs, no torch, no text.

Front end -> core: AddRequest, AbortRequests, Shutdown. Core -> front end: Ready (once, after the model
loaded) or Failed, then one StepOutputs per step (and after a batch of inputs changed the load), and Dead
if the core's loop fails. In process mode they travel msgpack-encoded (encode/decode_*); in thread mode
the same objects are handed over as they are."""

from __future__ import annotations

from typing import Any

import msgspec

from server.scheduler.request import SamplingParams
from server.structured_output import StructuredOutput


# -- front end -> core -----------------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams as a dict (params_to_wire / params_from_wire)
    arrival_time: float
    client: str


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


CoreInput = AddRequest | AbortRequests | Shutdown


# msgpack carries integers within int64 / uint64. Past int64, a count means what int64's largest does (more
# than any context) and a stop token id what an id just inside does (no such token), so they are clamped.
_INT64 = (-(2**63), 2**63 - 1)


def _clamp(value: int) -> int:
    return min(max(value, _INT64[0]), _INT64[1])


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as the channel carries it. logit_bias ids must be checked against the vocabulary
    first (NativeEngine.generate): they are not clamped."""
    wire = {name: getattr(params, name) for name in SamplingParams.__slots__}
    for name in ("max_tokens", "min_tokens", "top_k"):
        wire[name] = _clamp(wire[name])
    wire["stop_token_ids"] = [_clamp(t) for t in params.stop_token_ids]
    if params.structured is not None:
        s = params.structured
        wire["structured"] = [s.kind, s.value, s.starts_after]
    return wire


def params_from_wire(wire: dict[str, Any]) -> SamplingParams:
    fields = dict(wire)
    structured = fields.pop("structured", None)
    params = SamplingParams(**fields)
    if structured is not None:
        params.structured = StructuredOutput(*structured)
    params.logit_bias = {int(k): float(v) for k, v in params.logit_bias.items()}
    return params


# -- core -> front end -----------------------------------------------------------------------------------
class RequestOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one request got in one step. finish_reason is set when the core finished it: "stop" (EOS or a
    stop token; stop_reason is the token id or None), "length", "error" (can never fit; `error` says why),
    or "refused" (the request cannot be served at all: the front end raises EngineError with `error`)."""

    request_id: str
    new_token_ids: list[int]
    # Per new token, when the request asked for logprobs: [logprob, top ids, top logprobs].
    logprobs: list[tuple[float, list[int], list[float]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    scheduled_time: float | None = None  # monotonic (the same clock in both processes), first output only


class CoreStats(msgspec.Struct, array_like=True):
    """The load and counters the front end answers load() and stats() from, sent with every step."""

    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    kv_usage: float
    num_added: int  # sequences the core has taken from its inbox so far (the front end counts what it sent)
    num_added_tokens: int
    counters: dict[str, float]  # num_preemptions_total, prefix cache, num_kv_blocks, spec decode


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    outputs: list[RequestOutput]
    stats: CoreStats
    step: int  # steps run so far


class Ready(msgspec.Struct, tag=True, array_like=True):
    """What the front end needs of the model, from the core that loaded it."""

    model_dir: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    stats: CoreStats  # the idle core's load and counters (the KV cache's size among them)


class Failed(msgspec.Struct, tag=True, array_like=True):
    """The core could not load the model."""

    error_type: str
    message: str


class Dead(msgspec.Struct, tag=True, array_like=True):
    """The core's loop failed; no request will advance again."""

    message: str


CoreOutput = StepOutputs | Ready | Failed | Dead

_encoder = msgspec.msgpack.Encoder()
_input_decoder = msgspec.msgpack.Decoder(CoreInput)
_output_decoder = msgspec.msgpack.Decoder(CoreOutput)


def encode(message: CoreInput | CoreOutput) -> bytes:
    return _encoder.encode(message)


def decode_input(data: bytes) -> CoreInput:
    return _input_decoder.decode(data)


def decode_output(data: bytes) -> CoreOutput:
    return _output_decoder.decode(data)
