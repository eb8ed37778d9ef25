"""One request's token choice, step by step: greedy or beam search, exactly as `model.generate` chooses.

The iteration-level batcher (continuous.py) runs one forward for every row in flight and
then hands each request the logits of its own rows; what the request picks must be what
the offline engine (`MultiTenantEngine.generate`, i.e. transformers' `generate`) would pick
for it, whatever else is in the batch. So:

* greedy: the float32 copy of the last logits, `min_new_tokens` (the end tokens at -inf
  until that many are out), argmax; the score is the sum of the chosen tokens'
  log-probabilities under the processed logits.
* beam search: transformers' own vectorised beam-search steps (`GenerationMixin`'s
  top-k continuation, next running beams, finished-beam update, early-stop heuristic and
  stopping condition), called for one request (batch size 1) with the prompt length 0 so
  that `cur_len` counts new tokens. In a batched `generate` these steps are per request
  and the loop's length limit is `max_new_tokens` for every request, so a request that
  stops here when its own beams are done gets the beams it would get there.

A decoder returns, per step, which of its rows each new row continues (`sources`, local
indices: the batcher reorders the KV cache with them) and the rows' next input tokens.
"""
from __future__ import annotations

import torch
from transformers.generation.utils import GenerationMixin

NEG = -1.0e9          # transformers' "never" score


def end_masked(logits: torch.Tensor, eos: list[int], produced: int, min_new_tokens: int | None) -> torch.Tensor:
    """`MinNewTokensLengthLogitsProcessor`: end tokens impossible until `min_new_tokens` are out."""
    if min_new_tokens and produced < min_new_tokens and eos:
        logits[:, eos] = -float("inf")
    return logits


class GreedyDecoder:
    rows = 1

    def __init__(self, eos: set[int], max_new_tokens: int, min_new_tokens: int | None = None, scores: bool = False):
        self.eos, self.max_new, self.min_new = sorted(eos), max_new_tokens, min_new_tokens
        self.tokens: list[int] = []
        self.score = 0.0 if scores else None             # a log-softmax over the vocabulary per step: on request
        self.done = False

    def step(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """logits (1, V) of its row -> (sources [0], next tokens [t])."""
        scores = end_masked(logits.float(), self.eos, len(self.tokens), self.min_new)
        t = int(scores[0].argmax())
        if self.score is not None:
            self.score += float(scores[0].log_softmax(-1)[t])
        self.tokens.append(t)
        self.done = t in self.eos or len(self.tokens) >= self.max_new
        return [0], [t]

    def new_tokens(self) -> list[int]:
        """Tokens chosen so far (streamed as they come)."""
        return self.tokens

    def result(self) -> tuple[list[int], float | None]:
        return self.tokens, self.score


class BeamDecoder:
    """Beam search for one request over its `beams` rows (transformers' steps, batch size 1)."""

    def __init__(self, eos: set[int], max_new_tokens: int, beams: int, min_new_tokens: int | None = None,
                 length_penalty: float = 1.0, early_stopping: bool | str = False, fill: int = 0,
                 device: torch.device | str = "cpu"):
        self.eos, self.max_new, self.min_new = sorted(eos), max_new_tokens, min_new_tokens
        self.rows, self.length_penalty, self.early_stopping = beams, length_penalty, early_stopping
        self.keep = max(2, 1 + len(self.eos)) * beams                     # candidates kept per step
        self.top_mask = torch.arange(self.keep, device=device) < beams      # (keep,)
        self.running = torch.full((1, beams, max_new_tokens), fill, dtype=torch.long, device=device)
        self.finished_seqs = self.running.clone()                          # (1, beams, max_new)
        self.running_scores = torch.zeros(1, beams, device=device)
        self.running_scores[:, 1:] = NEG                                    # only beam 0 is real at first
        self.finished_scores = torch.full((1, beams), NEG, device=device)
        self.is_finished = torch.zeros(1, beams, dtype=torch.bool, device=device)
        self.may_improve = torch.ones(1, 1, dtype=torch.bool, device=device)
        self.running_idx = torch.full((1, beams, max_new_tokens), -1, dtype=torch.int32, device=device)
        self.finished_idx = self.running_idx.clone()
        self.eos_t = torch.tensor(self.eos, dtype=torch.long, device=device)
        self.cur = 0
        self.done = False

    def step(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """logits (beams, V) of its rows -> (source row of each new row, next tokens)."""
        g, beams, V = GenerationMixin, self.rows, logits.shape[-1]
        logp = end_masked(logits.float().log_softmax(-1), self.eos, self.cur, self.min_new)   # (beams, V)
        acc = (logp[None] + self.running_scores[:, :, None]).reshape(1, beams * V)
        topk_lp, topk_seqs, topk_idx = g._get_top_k_continuations(
            g, acc, self.running, self.running_idx, cur_len=self.cur, decoder_prompt_len=0, do_sample=False,
            beams_to_keep=self.keep, num_beams=beams, batch_size=1)
        last = topk_seqs[:, :, self.cur]                                   # (1, keep)
        hits = torch.isin(last, self.eos_t) | (self.cur + 1 >= self.max_new)
        self.running, self.running_scores, self.running_idx = g._get_running_beams_for_next_iteration(
            g, topk_lp, topk_seqs, topk_idx, hits, beams)
        self.finished_seqs, self.finished_scores, self.finished_idx, self.is_finished = g._update_finished_beams(
            g, self.finished_seqs, topk_seqs, self.finished_scores, topk_lp, self.finished_idx, topk_idx,
            self.may_improve, self.is_finished, hits, self.top_mask, beams, self.cur, 0, self.length_penalty,
            self.early_stopping)
        sources = self.running_idx[0, :, self.cur].tolist()               # beam each new row continues
        tokens = self.running[0, :, self.cur].tolist()
        self.cur += 1
        self.may_improve = g._check_early_stop_heuristic(
            self.may_improve, self.running_scores, self.finished_scores, self.is_finished, self.cur,
            self.max_new, 0, self.early_stopping, self.length_penalty)
        self.done = not bool(g._beam_search_has_unfinished_sequences(
            self.may_improve, self.is_finished, hits, self.early_stopping))
        return sources, tokens

    def new_tokens(self) -> list[int]:
        return []                                                          # nothing is final before the end

    def result(self) -> tuple[list[int], float]:
        """The best finished beam (its tokens up to its length) and its length-normalised score."""
        n = int((self.finished_idx[0, 0] >= 0).sum())
        return self.finished_seqs[0, 0, :n].tolist(), float(self.finished_scores[0, 0])
