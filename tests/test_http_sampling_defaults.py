"""Sampling defaults from the model's generation_config.json (vLLM's `--generation-config auto`), on both
engines: the embedded SmolLM2 recommends temperature 0.2 and top_p 0.9; a request that sets a field keeps
it; `engine.generation_config: vllm` turns the model's defaults off."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.app import create_app
from server.generation_defaults import NO_DEFAULTS, SamplingDefaults, load_sampling_defaults
from tests.conftest import http_config, start_server


class RecordingEngine:
    """The shared engine, with the sampling params of every request kept."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.params: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, request: Any) -> Any:
        self.params.append(request.params)
        return self._engine.generate(request)


@pytest.fixture()
def recording_server(loop_thread, engine):
    servers = []

    def make(generation_config: str = "auto") -> tuple[Any, RecordingEngine]:
        cfg = http_config()
        cfg.engine.generation_config = generation_config
        recorder = RecordingEngine(engine)
        handle = start_server(loop_thread, create_app(cfg, recorder, manage_engine=False))
        servers.append(handle)
        return handle, recorder

    yield make
    for handle in servers:
        handle.stop()


def _complete(handle, **fields: Any) -> None:
    with handle.http() as http:
        response = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, **fields})
    assert response.status_code == 200, response.text


def test_the_models_recommended_sampling_applies_to_unset_fields(recording_server):
    handle, recorder = recording_server()
    assert handle.serving.sampling_defaults == SamplingDefaults(temperature=0.2, top_p=0.9)
    _complete(handle)
    _complete(handle, temperature=0.7, top_p=0.5)
    (default, explicit) = recorder.params
    assert (default.temperature, default.top_p) == (0.2, 0.9)
    assert (explicit.temperature, explicit.top_p) == (0.7, 0.5)


def test_generation_config_vllm_turns_the_defaults_off(recording_server):
    handle, recorder = recording_server("vllm")
    assert handle.serving.sampling_defaults == NO_DEFAULTS
    _complete(handle)
    assert (recorder.params[0].temperature, recorder.params[0].top_p) == (1.0, 1.0)


CASES = [  # generation_config.json -> defaults
    ({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1]}, SamplingDefaults(0.6, 0.95, 20)),
    (
        {"max_new_tokens": 64, "repetition_penalty": 1.1, "min_p": 0.05},
        SamplingDefaults(None, None, None, 0.05, 1.1, 64),
    ),
    ({"do_sample": True}, NO_DEFAULTS),
]


@pytest.mark.parametrize(("content", "expected"), CASES)
def test_generation_config_fields(tmp_path, content, expected):
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    assert load_sampling_defaults("auto", tmp_path) == expected
    assert load_sampling_defaults(str(tmp_path), None) == expected
    assert load_sampling_defaults("vllm", tmp_path) == NO_DEFAULTS


def test_missing_or_broken_file_means_no_defaults(tmp_path):
    assert load_sampling_defaults("auto", tmp_path) == NO_DEFAULTS
    (tmp_path / "generation_config.json").write_text("{not json")
    assert load_sampling_defaults("auto", tmp_path) == NO_DEFAULTS
