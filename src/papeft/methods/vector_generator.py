"""The vector generator (VG) of PARADE / PARA / PEDRO and its poolers.

PARADE eq. (6):  l = g( Pool( h W_down ) ) W_up + b_up ;  l_q, l_v, l_u = Split(l)

`h` is one decoder layer's input over the *prompt* tokens only: `mask` marks
them, and padding and response tokens never enter the pool. For the linear
poolers (last token, mean) pooling before or after W_down is the same thing,
so PARA's "pool -> down -> act -> up" is this module with `LastTokenPooler`.
PEDRO is this module with g = `RationalActivation` (a learnable rational function).

The maths is one function, `generator_vectors`: with the generator's own weights
(training, `VectorGenerator.forward`) or with one tenant's weights per batch row
(serving: serving/banks.py stacks many tenants' generators and gathers per row).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from papeft.methods.rational import PAU_GELU_INIT, RationalActivation


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
    `attention=False` starts the logits at zero instead (no v_k), and
    `refinements` sets how many routing updates follow the first pass.
    """

    def __init__(self, r: int, num_capsules: int, attention: bool = True, refinements: int = 1):
        super().__init__()
        if r % num_capsules:
            raise ValueError(f"method.r={r} must be divisible by method.num_capsules={num_capsules}")
        self.K, self.c, self.refinements = num_capsules, r // num_capsules, refinements
        self.W = nn.Parameter(torch.randn(num_capsules, r, self.c) * 0.02)  # (K, r, r/K)
        self.v = nn.Parameter(torch.randn(num_capsules, r) * 0.02) if attention else None  # (K, r)

    rowwise_params = True      # W (B, K, r, c) and v (B, K, r) may carry a row axis: one tenant per row

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = h.shape[:2]
        row = "b" if self.W.dim() == 4 else ""                     # per-row weights (serving) or shared
        tok_mask = mask[:, None, :]                                # (B, 1, T)
        m = torch.einsum(f"btr,{row}krc->bktc", h, self.W)         # (B, K, T, c)  eq. 7
        if self.v is not None:
            b = torch.einsum(f"btr,{row}kr->bkt", h, self.v)       # (B, K, T)     eq. 9
        else:
            b = h.new_zeros(B, self.K, T)                          # (B, K, T)     uniform start
        c = squash(torch.einsum("bkt,bktc->bkc", masked_softmax(b, tok_mask), m))  # (B, K, c) eq. 8
        for _ in range(self.refinements):
            b = b + torch.einsum("bkc,bktc->bkt", c, m)            # eq. 10
            c = squash(torch.einsum("bkt,bktc->bkc", masked_softmax(b, tok_mask), m))
        return c.reshape(B, self.K * self.c)                       # (B, r)


class RoutingPooler(CapsulePooler):
    """Classic dynamic-routing capsule pooler (Zhang et al. 2018) with one iteration (PARADE-2).

    Routing logits start at zero and one iteration means no update of them, so
    every prompt token is coupled equally: c_k = squash(masked mean_j m_jk).
    Our reading: the routing softmax runs over the prompt tokens, the axis of
    PARADE's eq. (9), not over the output capsules as in Sabour et al. (2017);
    over capsules, zero logits would give every token weight 1/K and s_k would
    be a *sum* over tokens that grows with the prompt's length.
    """

    def __init__(self, r: int, num_capsules: int):
        super().__init__(r, num_capsules, attention=False, refinements=0)


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


POOLERS = {"capsule": CapsulePooler, "routing": RoutingPooler, "last": LastTokenPooler, "mean": MeanPooler}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity,
               "rational": RationalActivation,                                  # GELU fit on [-5, 5]
               "rational_pau": partial(RationalActivation, PAU_GELU_INIT)}      # METHODS.md coefficients


def make_pooler(name: str, r: int, num_capsules: int) -> nn.Module:
    if name not in POOLERS:
        raise ValueError(f"method.pooler='{name}' is unknown; expected one of {sorted(POOLERS)}")
    cls = POOLERS[name]
    return cls(r, num_capsules) if issubclass(cls, CapsulePooler) else cls()


def make_activation(name: str) -> nn.Module:
    """A fresh instance, so a learnable activation (rational) is one per generator."""
    if name not in ACTIVATIONS:
        raise ValueError(f"method.activation='{name}' is unknown; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


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
        return generator_vectors(self, h, mask)

    def row_weights(self) -> dict[str, torch.Tensor]:
        """This generator's weights as `generator_vectors` reads them per row (after a leading row
        axis is stacked on): every parameter by name, the two linear weights transposed (in, out)."""
        return {n: p.detach().T if n in ROW_TRANSPOSED else p.detach() for n, p in self.named_parameters()}


ROW_TRANSPOSED = ("down.weight", "up.weight")     # per-row linear weights are stored (in, out), as bmm reads them


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b over the last axis. `weight` (out, in) is shared by every row (nn.Linear's layout);
    (B, in, out) is one per row, for x (B, T, in) or (B, in)."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    rows = x if x.dim() == 3 else x[:, None, :]                           # (B, T, in)
    out = torch.bmm(rows, weight) if bias is None else torch.baddbmm(bias[:, None, :], rows, weight)
    return out if x.dim() == 3 else out[:, 0]


def per_row(module: nn.Module, params: dict[str, torch.Tensor] | None, *inputs: torch.Tensor) -> torch.Tensor:
    """`module` applied to `inputs`: with its own weights (`params` None or empty), or to each row with
    that row's own `params` (each (B, ...)). Modules that declare `rowwise_params` take the (B, ...)
    parameters as they are; others run vectorised over rows (torch.func.vmap), no Python loop."""
    if not params:
        return module(*inputs)
    if getattr(module, "rowwise_params", False):
        return functional_call(module, params, inputs)
    one = lambda p, *xs: functional_call(module, p, tuple(x[None] for x in xs))[0]   # noqa: E731
    return vmap(one)(params, *inputs)


def generator_vectors(g: VectorGenerator, h: torch.Tensor, mask: torch.Tensor,
                      rows: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PARADE eq. (6), l = g(Pool(h W_down)) W_up + b_up split per role, for prompts h (B, T, d) with
    `mask` (B, T) -> {role: (B, width)}.

    `rows` None: `g`'s own weights, shared by every row (training). Otherwise every parameter of `g`
    by name with a leading row axis, one tenant per row, laid out as `VectorGenerator.row_weights`
    (serving); `g` then lends only its structure (roles, widths, pooler and activation kinds).
    """
    if rows is None:
        down, up, bias, pooler_w, act_w = g.down.weight, g.up.weight, g.up.bias, None, None
    else:
        down, up, bias = rows["down.weight"], rows["up.weight"], rows["up.bias"]
        pooler_w, act_w = _under(rows, "pooler."), _under(rows, "act.")
    x = project(h.to(down.dtype), down)                                   # (B, T, r)
    pooled = per_row(g.pooler, pooler_w, x, mask.bool())                   # (B, r)
    l = project(per_row(g.act, act_w, pooled), up, bias)                   # (B, sum widths)
    return dict(zip(g.roles, l.split(g.widths, dim=-1)))                  # role -> (B, width)


def _under(named: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in named.items() if k.startswith(prefix)}
