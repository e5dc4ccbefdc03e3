"""Workload datasets: what each request asks for. All are deterministic for a seed.

- random: prompts of random tokens, input and output lengths uniform in len*(1 - r)..len*(1 + r)
  (vLLM's --random-input-len / --random-output-len / --random-range-ratio).
- sharegpt: the first human turn of each conversation of a ShareGPT-format JSON file; the output length is
  the token length of the reply that followed (vLLM's sharegpt dataset, with its length filters).
- shared_prefix: many requests sharing a long system prompt (num_prefixes distinct ones), each with its own
  short question, the workload of an assistant deployed behind one fixed instruction block.

Prompts are text, so the same requests go to any OpenAI-compatible server; the random text is tokens
decoded and re-encoded until the tokenizer gives the target length (or close: the server's usage then
reports the true count)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SampleRequest:
    prompt: str  # the user turn (chat) or the whole prompt after `system` (completions)
    prompt_len: int  # tokens of system + prompt, as the tokenizer counts them (no chat template)
    expected_output_len: int  # max_tokens sent; with ignore_eos the server generates exactly this many
    system: str | None = None  # shared_prefix: the shared system prompt


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a model directory's tokenizer.json (fast to import;
    transformers' AutoTokenizer is the fallback for directories without one)."""

    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "tokenizer.json"
        if path.exists():
            from tokenizers import Tokenizer as RustTokenizer

            self._tok = RustTokenizer.from_file(str(path))
            self._special = set(self._tok.get_added_tokens_decoder())
            self._hf = None
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(model_dir)
            self._special = set(self._hf.all_special_ids)
        self.name = str(model_dir)

    @property
    def vocab_size(self) -> int:
        return self._hf.vocab_size if self._hf is not None else self._tok.get_vocab_size()

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True)


def _lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def _random_ids(rng: random.Random, tok: Tokenizer, n: int) -> list[int]:
    is_special = getattr(tok, "is_special", lambda _id: False)
    ids: list[int] = []
    while len(ids) < n:
        token_id = rng.randrange(tok.vocab_size)
        if not is_special(token_id):
            ids.append(token_id)
    return ids


def random_text(rng: random.Random, tok: Tokenizer, num_tokens: int) -> tuple[str, int]:
    """Text of about num_tokens random tokens, and its token count. Decoding then re-encoding merges or
    splits tokens at the seams, so the ids are trimmed or topped up a few times until the count fits."""
    ids = _random_ids(rng, tok, num_tokens)
    text = tok.decode(ids)
    for _ in range(8):
        ids = tok.encode(text)
        if len(ids) == num_tokens:
            break
        ids = (
            ids[:num_tokens] if len(ids) > num_tokens else ids + _random_ids(rng, tok, num_tokens - len(ids))
        )
        text = tok.decode(ids)
    return text, len(tok.encode(text))


def random_dataset(
    tok: Tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0
) -> list[SampleRequest]:
    rng = random.Random(seed)
    inputs = _lengths(rng, num_prompts, input_len, range_ratio)
    outputs = _lengths(rng, num_prompts, output_len, range_ratio)
    requests = []
    for n_in, n_out in zip(inputs, outputs, strict=True):
        text, n = random_text(rng, tok, n_in)
        requests.append(SampleRequest(text, n, n_out))
    return requests


def shared_prefix_dataset(
    tok: Tokenizer,
    num_prompts: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    num_prefixes: int = 1,
    seed: int = 0,
) -> list[SampleRequest]:
    """num_prompts requests spread round-robin over num_prefixes system prompts of prefix_len tokens,
    each with its own suffix_len-token question, in a seeded shuffled order."""
    rng = random.Random(seed)
    prefixes = [random_text(rng, tok, prefix_len) for _ in range(num_prefixes)]
    requests = []
    for i in range(num_prompts):
        system, n_system = prefixes[i % num_prefixes]
        text, n = random_text(rng, tok, suffix_len)
        requests.append(SampleRequest(text, n_system + n, output_len, system=system))
    rng.shuffle(requests)
    return requests


def _first_exchange(entry: dict[str, Any]) -> tuple[str, str] | None:
    turns = entry.get("conversations") or entry.get("conversation") or []
    for i in range(len(turns) - 1):
        if turns[i].get("from") == "human" and turns[i + 1].get("from") == "gpt":
            return turns[i]["value"], turns[i + 1]["value"]
    return None


def sharegpt_dataset(
    tok: Tokenizer,
    path: str | Path,
    num_prompts: int,
    output_len: int | None = None,
    seed: int = 0,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[SampleRequest]:
    """Requests from a ShareGPT-format file ([{"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}, ...]), shuffled with the seed. Like vLLM's loader, pairs with a
    prompt or reply under 4 tokens, a prompt over max_prompt_len or a total over max_total_len are
    skipped; output_len, when given, replaces the reply's length."""
    entries = json.loads(Path(path).read_text())
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    requests: list[SampleRequest] = []
    for index in order:
        if len(requests) == num_prompts:
            break
        pair = _first_exchange(entries[index])
        if pair is None:
            continue
        prompt, reply = pair
        n_in = len(tok.encode(prompt))
        n_out = output_len if output_len is not None else len(tok.encode(reply))
        if n_in < 4 or n_out < 4 or n_in > max_prompt_len or n_in + n_out > max_total_len:
            continue
        requests.append(SampleRequest(prompt, n_in, n_out))
    if len(requests) < num_prompts:
        raise ValueError(f"{path}: only {len(requests)} usable conversations, {num_prompts} asked for")
    return requests
