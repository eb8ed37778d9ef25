"""The vector generator (VG) of PARADE / PARA / PEDRO and its poolers.

PARADE eq. (6):  l = g( Pool( h W_down ) ) W_up + b_up ;  l_q, l_v, l_u = Split(l)

`h` is one decoder layer's input over the *prompt* tokens only: `mask` marks
them, and padding and response tokens never enter the pool. For the linear
poolers (last token, mean) pooling before or after W_down is the same thing,
so PARA's "pool -> down -> act -> up" is this module with `LastTokenPooler`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def squash(s: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule squash (PARADE eq. 8): |s|^2/(1+|s|^2) * s/|s| = s*|s|/(1+|s|^2), safe at s=0."""
    sq = (s * s).sum(-1, keepdim=True)
    return s * torch.sqrt(sq + eps) / (1.0 + sq)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis (tokens) with masked positions given exactly zero weight."""
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1) * mask


class CapsulePooler(nn.Module):
    """Attentional capsule (AC) pooler, PARADE eqs. (7)-(10), in r-space.

    K output capsules of size r/K; routing logits start from attention scores
    v_k . h'_j and get exactly one refinement b_jk += c_k . m_jk (the paper
    writes c_k . h'_j, whose sizes do not agree: our reading, METHODS.md 1).
    """

    def __init__(self, r: int, num_capsules: int):
        super().__init__()
        if r % num_capsules:
            raise ValueError(f"method.r={r} must be divisible by method.num_capsules={num_capsules}")
        self.K, self.c = num_capsules, r // num_capsules
        self.W = nn.Parameter(torch.randn(num_capsules, r, self.c) * 0.02)  # (K, r, r/K)
        self.v = nn.Parameter(torch.randn(num_capsules, r) * 0.02)          # (K, r)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B = h.shape[0]
        tok_mask = mask[:, None, :]                                # (B, 1, T)
        m = torch.einsum("btr,krc->bktc", h, self.W)               # (B, K, T, c)  eq. 7
        b = torch.einsum("btr,kr->bkt", h, self.v)                 # (B, K, T)     eq. 9
        c = squash(torch.einsum("bkt,bktc->bkc", masked_softmax(b, tok_mask), m))  # (B, K, c) eq. 8
        b = b + torch.einsum("bkc,bktc->bkt", c, m)                # eq. 10, one refinement
        c = squash(torch.einsum("bkt,bktc->bkc", masked_softmax(b, tok_mask), m))
        return c.reshape(B, self.K * self.c)                       # (B, r)


class LastTokenPooler(nn.Module):
    """The last prompt token's state (PARA; PARADE-1)."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        T = mask.shape[1]
        pos = torch.arange(T, device=mask.device).expand_as(mask)
        last = torch.where(mask, pos, -1).amax(dim=1)              # (B,)
        if (last < 0).any():
            raise ValueError("a row has no prompt token to pool")
        return h[torch.arange(h.shape[0], device=h.device), last]  # (B, r)


class MeanPooler(nn.Module):
    """Mean over the prompt tokens (offered for PARA)."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask.to(h.dtype)[..., None]                            # (B, T, 1)
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0)            # (B, r)


POOLERS = {"capsule": CapsulePooler, "last": LastTokenPooler, "mean": MeanPooler}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity}


def make_pooler(name: str, r: int, num_capsules: int) -> nn.Module:
    if name not in POOLERS:
        raise ValueError(f"method.pooler='{name}' is unknown; expected one of {sorted(POOLERS)}")
    return CapsulePooler(r, num_capsules) if name == "capsule" else POOLERS[name]()


class VectorGenerator(nn.Module):
    """One layer's generator: prompt states (B, T, d) -> one scaling vector per role.

    Init (PARADE sec. 4): W_down ~ N(0, 0.02), W_up = 0, b_up = 1, so every
    vector is exactly 1 at step 0 and the adapted model equals the backbone.
    """

    def __init__(self, d_model: int, r: int, out_widths: dict[str, int],
                 pooler: nn.Module, activation: nn.Module):
        super().__init__()
        self.roles = list(out_widths)
        self.widths = [out_widths[k] for k in self.roles]
        self.down = nn.Linear(d_model, r, bias=False)
        self.pooler = pooler
        self.act = activation
        self.up = nn.Linear(r, sum(self.widths), bias=True)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.up.weight)
        nn.init.ones_(self.up.bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = h.to(self.down.weight.dtype)
        pooled = self.pooler(self.down(h), mask.bool())            # (B, r)
        l = self.up(self.act(pooled))                              # (B, sum widths)
        return dict(zip(self.roles, l.split(self.widths, dim=-1)))  # role -> (B, width)
