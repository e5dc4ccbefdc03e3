"""The agent_apis section (model aliases, response store limits) and the response store's bounds."""

from __future__ import annotations

import pytest

from server import response_store
from server.agent_apis import AgentApisConfig, parse_agent_apis_config, resolve_model
from server.config import ConfigError
from server.errors import APIError
from server.response_store import ResponseStore


def test_aliases_resolve_to_the_served_model_and_nothing_else():
    cfg = parse_agent_apis_config({"model_aliases": {"claude-*": None, "gpt-5*": "glm-5", "other": "glm-4"}})
    assert resolve_model(cfg, "glm-5", "claude-sonnet-4-5") == "glm-5"
    assert resolve_model(cfg, "glm-5", "gpt-5-codex") == "glm-5"
    assert resolve_model(cfg, "glm-5", None) == resolve_model(cfg, "glm-5", "glm-5") == "glm-5"
    for unknown in ("gpt-4o", "other", "claude"):  # "other" names a model this server does not serve
        with pytest.raises(APIError) as error:
            resolve_model(cfg, "glm-5", unknown)
        assert error.value.status == 404
    assert resolve_model(AgentApisConfig(), "glm-5", "claude-haiku-4-5") == "glm-5"  # the default alias


@pytest.mark.parametrize(
    "section, names",
    [
        ({"aliases": {}}, "agent_apis.aliases"),
        ({"model_aliases": ["claude-*"]}, "model_aliases"),
        ({"responses_max_stored": 0}, "responses_max_stored"),
        ({"responses_max_age_s": -1}, "responses_max_age_s"),
    ],
)
def test_bad_sections_are_config_errors_naming_the_key(section, names):
    with pytest.raises(ConfigError, match=names):
        parse_agent_apis_config(section)


def response(response_id: str) -> dict:
    return {"id": response_id, "object": "response", "output": []}


def test_the_store_is_per_key_and_bounded_by_count_and_age(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(response_store.time, "time", lambda: now[0])
    store = ResponseStore(tmp_path / "responses.sqlite", max_stored=2, max_age_s=60)
    conversation = [{"role": "user", "content": "hi"}]
    store.save("key-a", response("resp_1"), conversation)
    assert store.get("resp_1", "key-a").conversation == conversation
    assert store.get("resp_1", "key-b") is None and not store.delete("resp_1", "key-b")

    for i in (2, 3):
        now[0] += 1
        store.save("key-a", response(f"resp_{i}"), conversation)
    store.save("key-b", response("resp_b"), conversation)
    assert store.get("resp_1", "key-a") is None  # key-a keeps its newest 2
    assert [store.get(f"resp_{i}", "key-a") is not None for i in (2, 3)] == [True, True]

    now[0] += 61  # past the age limit: gone, even before anything prunes it
    assert store.get("resp_3", "key-a") is None and store.get("resp_b", "key-b") is None
    store.save("key-b", response("resp_c"), conversation)
    assert store.delete("resp_c", "key-b") and store.get("resp_c", "key-b") is None
