"""/v1/completions through a real uvicorn server and the official openai client (engine-agnostic)."""

from __future__ import annotations

import json

from openai.types import Completion

PROMPT = "The capital of France is"
LONG = {"ignore_eos": True}


def complete(client, server, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    return client.completions.create(model=server.serving.served_model_name, **kwargs)


def token_ids(server, prompt: str = PROMPT) -> list[int]:
    with server.http() as http:
        response = http.post("/tokenize", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_plain_completion(server, client):
    response = complete(client, server, max_tokens=6, extra_body=LONG)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    (choice,) = response.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(token_ids(server))
    assert response.usage.completion_tokens == 6
    with server.http() as http:
        raw = http.post(
            "/v1/completions", json={"model": response.model, "prompt": PROMPT, "max_tokens": 2}
        ).json()
    Completion.model_validate(raw)


def test_streaming_agrees_with_non_streaming(server, client):
    common = dict(max_tokens=10, temperature=0.7, seed=7)
    full = complete(client, server, **common)
    chunks = list(complete(client, server, stream=True, stream_options={"include_usage": True}, **common))
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        full.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_echo_prepends_the_prompt(server, client):
    response = complete(client, server, max_tokens=4, echo=True, extra_body=LONG)
    assert response.choices[0].text.startswith(PROMPT)
    chunks = list(complete(client, server, max_tokens=4, echo=True, stream=True, extra_body=LONG))
    assert "".join(c.choices[0].text for c in chunks).startswith(PROMPT)


def test_logprobs_with_and_without_echo(server, client):
    response = complete(client, server, max_tokens=5, logprobs=2, extra_body=LONG)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0

    echoed = complete(client, server, max_tokens=5, logprobs=1, echo=True, extra_body=LONG)
    lp = echoed.choices[0].logprobs
    n_prompt = echoed.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 5
    assert (
        lp.token_logprobs[:n_prompt] == [None] * n_prompt and lp.top_logprobs[:n_prompt] == [None] * n_prompt
    )
    assert all(isinstance(x, float) for x in lp.token_logprobs[n_prompt:])
    assert lp.text_offset[n_prompt] >= len(PROMPT) - 1

    chunks = list(complete(client, server, max_tokens=5, logprobs=1, stream=True, extra_body=LONG))
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices[0].logprobs) == 5


def test_token_id_prompts_and_batches(server, client):
    ids = token_ids(server)
    by_ids = complete(client, server, prompt=ids, max_tokens=3, temperature=0, extra_body=LONG)
    by_text = complete(client, server, max_tokens=3, temperature=0, extra_body=LONG)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text

    other = "Once upon a time"
    batch = complete(client, server, prompt=[PROMPT, other], n=2, max_tokens=3, extra_body=LONG)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == len(ids) + len(token_ids(server, other))
    assert batch.usage.completion_tokens == 12
    echoed = complete(client, server, prompt=[PROMPT, other], max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT) and echoed.choices[1].text.startswith(other)

    chunks = list(complete(client, server, prompt=[ids, ids], max_tokens=3, stream=True, extra_body=LONG))
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_stop_and_seed(server, client):
    full = complete(client, server, max_tokens=30, temperature=0, extra_body=LONG).choices[0].text
    stop = next(
        full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip() == full[i : i + 2]
    )
    cut = complete(client, server, max_tokens=30, temperature=0, stop=[stop], extra_body=LONG).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]
    a = complete(client, server, max_tokens=12, temperature=1.0, seed=3).choices[0].text
    b = complete(client, server, max_tokens=12, temperature=1.0, seed=3).choices[0].text
    assert a == b


def test_raw_stream_ends_with_done(server):
    body = {"model": server.serving.served_model_name, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event)
        # OpenAI streams finish_reason null until the end, though its Completion type says otherwise
        for choice in chunk["choices"]:
            assert choice["finish_reason"] in (None, "stop", "length")
            choice["finish_reason"] = choice["finish_reason"] or "stop"
        Completion.model_validate(chunk)
