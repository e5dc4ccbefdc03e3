"""Incremental detokenization with stop strings.

Text is decoded over a short window of recent tokens so that each step costs O(1), and a token that ends
inside a multi-byte UTF-8 character (decoded as U+FFFD) is held until the character completes. Text that
could be the beginning of a stop string is held back until it is known not to be one."""

from __future__ import annotations

from dataclasses import dataclass

_CONTEXT_TOKENS = 6


@dataclass(slots=True)
class DetokenizerStep:
    text: str  # new text safe to send
    stop: str | None = None  # the stop string that matched, if any


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.include_stop = include_stop_str_in_output
        self.output_text = ""  # all decoded text so far
        self.sent = 0  # characters of output_text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, final: bool = False) -> DetokenizerStep:
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if full.endswith("\ufffd") and not final:
            new = ""  # an incomplete UTF-8 character: wait for the next token
        else:
            new = full[len(prefix) :] if full.startswith(prefix) else full
            self.prefix_offset = max(0, len(self.tokens) - _CONTEXT_TOKENS)
            self.read_offset = len(self.tokens)
            if self.prefix_offset > 4096:
                del self.tokens[: self.prefix_offset - _CONTEXT_TOKENS]
                self.read_offset -= self.prefix_offset - _CONTEXT_TOKENS
                self.prefix_offset = _CONTEXT_TOKENS
        start = max(0, len(self.output_text) - self.hold)
        self.output_text += new
        if self.stop and new:
            hit = self._find_stop(start)
            if hit is not None:
                return hit
        end = len(self.output_text) if final else max(self.sent, len(self.output_text) - self.hold)
        return DetokenizerStep(self._take(end))

    def flush(self) -> str:
        """The held-back text, once the request finished for another reason."""
        return self._take(len(self.output_text))

    def _take(self, end: int) -> str:
        text = self.output_text[self.sent : end]
        self.sent = max(self.sent, end)
        return text

    def _find_stop(self, start: int) -> DetokenizerStep | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.output_text.find(s, start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        cut = idx + len(s) if self.include_stop else idx
        self.output_text = self.output_text[:cut]
        return DetokenizerStep(self._take(cut), stop=s)
