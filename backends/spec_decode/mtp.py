"""The `mtp` drafter: the model's own multi-token-prediction layer (backends/models/mtp.py) proposes the
draft tokens, greedily, as vLLM's MTP proposer does.

Every step the MTP layer catches up with the target model: for each request the step computed, it runs at
the positions whose tokens were accepted, on (the token after each position, the target's final hidden
state there), writing its own KV cache (one more layer in the same block pool, under the same block ids).
Its output at the last accepted position predicts the first draft, which goes after the token the step
produced; each further draft runs the layer once more at the next position on (the previous draft, the
layer's own output). Those extra positions lie beyond the computed tokens: the next catch-up overwrites
them, and drafting stops where the request's blocks end."""

from __future__ import annotations

import torch

from server.scheduler.request import Request


class MtpDrafter:
    def __init__(self, runner, num_speculative_tokens: int):
        self.runner = runner
        self.k = num_speculative_tokens
        self.tables: dict[str, list[int]] = {}  # block tables of the last step's requests (live lists)

    @torch.inference_mode()
    def propose(self, requests: list[Request]) -> list[list[int]]:
        last = self.catch_up()
        wanted = [r for r in requests if r.request_id in last]
        drafts: dict[str, list[int]] = {r.request_id: [] for r in requests}
        if not wanted:
            return [drafts[r.request_id] for r in requests]
        hidden = torch.stack([last[r.request_id] for r in wanted])
        tokens = self.next_tokens(hidden)
        positions = [r.num_computed_tokens for r in wanted]  # where the step's new token sits
        for step in range(self.k):
            for r, token in zip(wanted, tokens, strict=True):
                drafts[r.request_id].append(token)
            if step == self.k - 1:
                break
            room = [self.fits(r, p) for r, p in zip(wanted, positions, strict=True)]
            if not all(room):  # a request whose blocks end here drafts no further
                keep = [i for i, ok in enumerate(room) if ok]
                wanted, hidden = [wanted[i] for i in keep], hidden[keep]
                tokens, positions = [tokens[i] for i in keep], [positions[i] for i in keep]
                if not wanted:
                    break
            hidden = self.forward(tokens, hidden, positions, wanted, [1] * len(wanted))
            tokens = self.next_tokens(hidden)
            positions = [p + 1 for p in positions]
        return [drafts[r.request_id] for r in requests]

    def catch_up(self) -> dict[str, torch.Tensor]:
        """Run the MTP layer over the last step's accepted positions; its output at each running request's
        last one, by request id."""
        if self.runner.last_step is None:
            return {}
        out, target_hidden = self.runner.last_step
        self.runner.last_step = None
        self.tables = {s.request.request_id: s.block_ids for s in out.scheduled}
        rows, ids, starts, lens, reqs = [], [], [], [], []
        offset = 0
        for s in out.scheduled:
            req, first = s.request, offset
            offset += s.num_new_tokens
            num_valid = req.num_computed_tokens - s.start
            if req.is_finished or num_valid <= 0:
                continue  # finished (blocks freed) or preempted
            tokens = req.all_token_ids()
            ids += tokens[s.start + 1 : s.start + num_valid + 1]
            rows += range(first, first + num_valid)
            starts.append(s.start)
            lens.append(num_valid)
            reqs.append(req)
        if not reqs:
            return {}
        hidden = self.forward(
            ids, target_hidden[torch.tensor(rows, device=target_hidden.device)], starts, reqs, lens
        )
        ends = torch.tensor(lens).cumsum(0) - 1
        return {r.request_id: hidden[int(end)] for r, end in zip(reqs, ends, strict=True)}

    def forward(self, ids, hidden, starts, reqs, lens) -> torch.Tensor:
        runner = self.runner
        model = runner.model
        attn = runner.attention_context(starts, lens, [self.tables[r.request_id] for r in reqs])
        embeds = model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=runner.device))
        return model.mtp.predict(embeds, hidden, attn.positions, runner.mtp_kv_cache, attn)

    def next_tokens(self, hidden: torch.Tensor) -> list[int]:
        logits = self.runner.model.compute_logits(hidden)
        return torch.argmax(logits[:, : self.runner.hf_config.vocab_size], dim=-1).tolist()

    def fits(self, request: Request, position: int) -> bool:
        return position < len(self.tables[request.request_id]) * self.runner.config.block_size
