"""Sampling defaults from the model's generation_config.json, as vLLM's `--generation-config auto`:
a request that leaves temperature, top_p, top_k, min_p, repetition_penalty or max_tokens unset gets the
model's recommended value instead of the API's neutral one. `engine.generation_config: vllm` turns it off."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

log = logging.getLogger("glm_serve.generation")
FILE = "generation_config.json"


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """None: the API's default (temperature 1, top_p 1, no top_k/min_p, repetition_penalty 1, the
    context left for max_tokens)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # generation_config's max_new_tokens


NO_DEFAULTS = SamplingDefaults()
_RENAMED = {"max_new_tokens": "max_tokens"}


def load_sampling_defaults(setting: str, model_dir: Path | str | None) -> SamplingDefaults:
    """setting: "auto" (the model directory's file), "vllm" (none), or a directory holding the file."""
    if setting == "vllm":
        return NO_DEFAULTS
    directory = Path(model_dir) if setting == "auto" and model_dir is not None else Path(setting)
    path = directory / FILE
    if not path.is_file():
        return NO_DEFAULTS
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s not read (%s): the API's sampling defaults apply", path, exc)
        return NO_DEFAULTS
    known = {f.name for f in fields(SamplingDefaults)}
    values = {_RENAMED.get(k, k): v for k, v in raw.items() if _RENAMED.get(k, k) in known and v is not None}
    defaults = SamplingDefaults(**values)
    if defaults != NO_DEFAULTS:
        log.info("sampling defaults from %s: %s", path, {k: v for k, v in values.items()})
    return defaults
