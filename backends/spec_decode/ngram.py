"""Prompt lookup (vLLM's `ngram` method): find the longest suffix of a request's tokens, between
prompt_lookup_min and prompt_lookup_max tokens long, that occurred earlier in its prompt or output, and
propose the tokens that followed its earliest occurrence. No model, no device: it costs a few vectorized
comparisons per request, and edits that copy their input get long runs of accepted tokens."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from backends.spec_decode.config import SpeculativeConfig
from server.scheduler.request import Request


class NgramDrafter:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.max_model_len = max_model_len

    def propose(self, requests: list[Request]) -> list[list[int]]:
        return [self.propose_one(r.all_token_ids()) for r in requests]

    def propose_one(self, token_ids: list[int]) -> list[int]:
        k = min(self.k, self.max_model_len - len(token_ids))
        if k <= 0 or len(token_ids) <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # windows[i] = tokens[i:i+n]; the last window is the suffix itself and is left out
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return token_ids[start : start + k]
        return []
