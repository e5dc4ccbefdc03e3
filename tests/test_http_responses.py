"""POST /v1/responses, GET and DELETE /v1/responses/{id} through the official `openai` SDK, against the
session's engine. Function tools, continuations and the Agents SDK: tests/test_http_agents.py; reasoning
items on the tiny random GLM-5: tests/test_http_agents_glm.py."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import API_KEY, FailingEngine

OTHER_KEY = "sk-test-key-2"
QUESTION = "Name three colors of the rainbow."


@pytest.fixture(scope="module")
def keyed(make_server) -> Any:
    return make_server(api_keys=[API_KEY, OTHER_KEY])


def test_create_answers_with_a_message_item_and_usage(keyed):
    client = keyed.client()
    response = client.responses.create(
        model=client.models.list().data[0].id,
        input=QUESTION, instructions="Be brief.", max_output_tokens=8, temperature=0,
    )  # fmt: skip
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    message = response.output[-1]
    assert (
        message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    )
    assert response.output_text == message.content[0].text and response.output_text
    usage = response.usage
    assert 0 < usage.output_tokens <= 8 and usage.input_tokens > 5
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.instructions == "Be brief." and response.store is True


def test_stream_event_sequence_matches_the_final_response(keyed):
    client = keyed.client()
    model = client.models.list().data[0].id
    with client.responses.stream(model=model, input=QUESTION, max_output_tokens=10, temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.content_part.added", "response.output_text.delta", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done"):  # fmt: skip
        assert kind in kinds, kinds
    final = events[-1].response
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == streamed and streamed
    if final.status == "completed":
        assert stream.get_final_response().output_text == streamed
    whole = client.responses.create(model=model, input=QUESTION, max_output_tokens=10, temperature=0)
    assert whole.output_text == streamed and whole.status == final.status


def test_stored_responses_belong_to_their_key(keyed):
    mine, theirs = keyed.client(), keyed.client(api_key=OTHER_KEY)
    model = mine.models.list().data[0].id
    created = mine.responses.create(model=model, input=QUESTION, max_output_tokens=3)
    assert mine.responses.retrieve(created.id).output_text == created.output_text
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as continued:
        theirs.responses.create(
            model=model, input="And more?", previous_response_id=created.id, max_output_tokens=3
        )
    assert continued.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(created.id)
    follow_up = mine.responses.create(
        model=model, input="And more?", previous_response_id=created.id, max_output_tokens=3
    )
    assert follow_up.previous_response_id == created.id
    assert follow_up.usage.input_tokens > created.usage.input_tokens  # the earlier turn was rendered
    mine.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        mine.responses.retrieve(created.id)
    unstored = mine.responses.create(model=model, input=QUESTION, max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        mine.responses.retrieve(unstored.id)


@pytest.mark.parametrize(
    "fields, names",
    [
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input_image"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
        ({"tool_choice": {"type": "file_search"}}, "file_search"),
        ({"temperature": 3}, "temperature"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_problem(keyed, fields, names):
    with keyed.http() as http:
        response = http.post("/v1/responses", json={"input": QUESTION, "max_output_tokens": 2, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and names in error["message"] + str(error["param"])


def test_text_format_json_schema_constrains_the_output(keyed):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "capital": {"type": "boolean"}},
        "required": ["city", "capital"],
        "additionalProperties": False,
    }
    response = keyed.client().responses.create(
        input="Describe Paris as JSON.", max_output_tokens=100, store=False,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert response.status == "completed", response
    value = json.loads(response.output_text)
    assert set(value) == {"city", "capital"} and isinstance(value["capital"], bool)


def test_unknown_ids_are_404(keyed):
    client = keyed.client()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input=QUESTION, previous_response_id="resp_missing", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError) as model:
        client.responses.create(model="no-such-model", input=QUESTION, max_output_tokens=2)
    assert model.value.body["code"] == "model_not_found"


def test_an_engine_failure_mid_stream_ends_with_response_failed(make_server, engine):
    failing = make_server(engine_override=FailingEngine(engine, after=2))
    client = failing.client()
    model = client.models.list().data[0].id
    with client.responses.stream(model=model, input=QUESTION, max_output_tokens=8) as stream:
        events = list(stream)
    assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
    assert events[-1].response.error.code == "internal_error"
    assert FailingEngine.SECRET not in events[-1].response.error.message
