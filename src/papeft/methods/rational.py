"""A learnable rational activation: the "safe" Pade activation unit of degrees 5/4 (PEDRO).

    R(x) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1 x + b2 x^2 + b3 x^3 + b4 x^4|)

The absolute value keeps the denominator >= 1, so R has no poles. Two GELU
inits (our reading):
* `GELU_INIT` (default, activation `rational`): a least-squares fit of this
  exact form to GELU on [-5, 5], the range PEDRO's Figure 2 plots; max error
  2.8e-3 there (0.22 at |x| = 8).
* `PAU_GELU_INIT` (activation `rational_pau`): the coefficients listed in
  METHODS.md 1 (the Pade-activation library's GELU fit). They are within 1e-3
  of GELU on [-3, 3] but part ways beyond |x| ~ 3.5 (error 4.0 at x = 5), so
  the default is our refit.

Coefficients are float32 parameters and R is evaluated in float32 whatever the
input dtype (the output is cast back): a degree-5 polynomial in bfloat16 loses
most of its digits. `module.to(torch.bfloat16)` leaves the coefficients float32.
"""
from __future__ import annotations

import torch
from torch import nn

# (numerator a0..a5, denominator b1..b4)
GELU_INIT = ((-0.0024460, 0.5001221, 0.4066258, 0.1102180, 0.0103846, 0.0001135),
             (-0.0151629, 0.2329746, -0.0033812, 0.0005248))
PAU_GELU_INIT = ((-0.000422107, 0.499999555, 0.402705355, 0.073669769, -0.012954788, -0.003741400),
                 (4.95854e-05, 0.147297741, 1.16458e-05, -0.007483872))


def _horner(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_i coeffs[..., i] x^i, evaluated from the highest power down. coeffs (n,) are shared;
    (B, n) are per row of x (B, ...) (serving: one tenant's coefficients per row)."""
    if coeffs.dim() == 2:
        coeffs = coeffs.view(coeffs.shape[0], *[1] * (x.dim() - 1), coeffs.shape[1])   # (B, 1.., n)
    out = torch.zeros_like(x) + coeffs[..., -1]
    for i in range(coeffs.shape[-1] - 2, -1, -1):
        out = out * x + coeffs[..., i]
    return out


class RationalActivation(nn.Module):
    """Safe PAU, degrees (5, 4), one instance per vector generator so every layer learns its own."""

    rowwise_params = True      # numerator (B, 6) / denominator (B, 4) may carry a row axis

    def __init__(self, init: tuple = GELU_INIT):
        super().__init__()
        numerator, denominator = init
        self.numerator = nn.Parameter(torch.tensor(numerator, dtype=torch.float32))      # (6,) a0..a5
        self.denominator = nn.Parameter(torch.tensor(denominator, dtype=torch.float32))  # (4,) b1..b4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        p = _horner(self.numerator, x32)
        q = 1.0 + (x32 * _horner(self.denominator, x32)).abs()    # b1 x + ... + b4 x^4
        return (p / q).to(x.dtype)

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts do not: the coefficients stay float32."""
        super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def extra_repr(self) -> str:
        return "degrees=(5, 4), safe"
