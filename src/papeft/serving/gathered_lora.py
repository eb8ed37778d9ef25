"""Gathered (BGMV-style) LoRA: every row of a batch with its own tenant's A and B, one batched matmul each.

Punica's BGMV kernel reads, for each row b, the weights of that row's adapter
and computes  y_b += (x_b A_b) B_b  for the whole batch at once. Here the same
with stock PyTorch: each LoRA tenant's weights sit in one slot of a stack per
module ((N, in, r) and (N, r, out)); at the start of a call the rows' slots are
gathered once (one `index_select` per tensor) and every module then adds

    delta = bmm( bmm(x, A[rows]), B[rows] )          # (B, T, in) -> (B, T, r) -> (B, T, out)

Rows without a LoRA tenant point at slot 0, which is all zeros, so their delta
is exactly 0. The scaling alpha / r is folded into B when a tenant is added.
Beams of one prompt share its weights: the beam rows are folded into the token
axis, (B*beams, T, in) -> (B, beams*T, in), so weights are gathered per prompt.
Compared with peft's mixed batch (a Python loop over the distinct adapters in
the batch, per module and per step) this is the fair, batched LoRA baseline.
"""
from __future__ import annotations

import torch

from papeft.methods.serving_form import LowRankDeltas
from papeft.serving.banks import Bank


class LoraBank(Bank):
    """LoRA tenants (`LowRankDeltas`) of one rank and one set of target modules, stacked per module."""

    zero_slot = True                                  # slot 0: rows without LoRA

    def __init__(self, form: LowRankDeltas):
        super().__init__(form)
        self.rank, self.sites = self.signature(form)   # sites: ((layer, module path), ...)

    @staticmethod
    def signature(form: LowRankDeltas) -> tuple:
        return form.rank, tuple(sorted(form.weights))

    def stacked(self, form: LowRankDeltas) -> dict[str, torch.Tensor]:
        weights = {}
        for (i, path), (A, B) in form.weights.items():
            weights[f"{i}.{path}.A"] = A.T                           # (in, r)
            weights[f"{i}.{path}.B"] = (B * form.scaling).T          # (r, out), scaling folded in
        return weights

    def join(self, call, prompts, slots) -> None:
        """Its weights, gathered once per call for every prompt (0 = no LoRA) and added by patched forwards."""
        per_prompt = torch.zeros(call.prompts, dtype=torch.long, device=slots.device)
        per_prompt[prompts] = slots
        call.lora[self] = self.gather(per_prompt)

    def gather(self, slots: torch.Tensor) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Per module, the rows' (A (B, in, r), B (B, r, out)); `slots` (B,) per prompt, 0 = no LoRA."""
        return {(i, p): (self.stack.gather(f"{i}.{p}.A", slots), self.stack.gather(f"{i}.{p}.B", slots))
                for i, p in self.sites}


def gathered_lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x (R, T, in) with R = prompts * beams; A (P, in, r), B (P, r, out) per prompt -> (R, T, out)."""
    R, T, _ = x.shape
    P = A.shape[0]
    xp = x.reshape(P, (R // P) * T, x.shape[-1]).to(A.dtype)         # (P, beams*T, in)
    return torch.bmm(torch.bmm(xp, A), B).reshape(R, T, B.shape[-1])  # (R, T, out)


def lora_forward(base, A: torch.Tensor, B: torch.Tensor):
    """A module's forward (`base`) plus the gathered LoRA delta, added in place to the (fresh) output;
    installed as the module's forward for one call, like the engine's scaled forwards."""
    def forward(x, *args, **kwargs):
        out = base(x, *args, **kwargs)
        return out.add_(gathered_lora_delta(x, A, B).to(out.dtype))
    return forward
