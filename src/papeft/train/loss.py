"""The training loss: cross-entropy of each response token (and its end token), nothing else.

A batch from `collate_train` carries `labels` (B, T), -100 except at response tokens; position t
predicts token t + 1, so the loss reads the logits of the positions just before each label.
`response_token_loss` runs the LM head at those N positions only (`AdaptedModel.logits_only_at`):
on COPA that is 2 of ~100 positions, and the 576 x 49152 head of SmolLM2 is about a fifth of
the forward's multiply-adds. `full_logits_token_loss` is the path before issue 13 (full-vocabulary
logits at every position, upcast to float32): tests and scripts/bench_train.py compare against it.
Both return the same (N,) losses, in row-major order of the label positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from papeft.methods.base import AdaptedModel

IGNORE = -100


def read_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at the positions whose next token is a label (the last position never is)."""
    return F.pad(labels[:, 1:] != IGNORE, (0, 1))


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def response_token_loss(model: AdaptedModel, batch: dict, runner=None) -> torch.Tensor:
    """Per-token cross-entropy (N,) with logits made only where the loss reads them.
    `runner` is the module to call (a data-parallel wrapper of `model`); `model` by default."""
    labels = batch["labels"]
    with model.logits_only_at(read_positions(labels)):
        logits = (runner or model)(**_inputs(batch)).logits                  # (N, V)
    target = labels[:, 1:][labels[:, 1:] != IGNORE]                          # (N,)
    return F.cross_entropy(logits.float(), target, reduction="none")


def full_logits_token_loss(model: AdaptedModel, batch: dict, runner=None) -> torch.Tensor:
    """The same losses (N,) from (B, T, V) logits at every position (the path before issue 13)."""
    labels = batch["labels"]
    logits = (runner or model)(**_inputs(batch)).logits[:, :-1].float()     # (B, T-1, V)
    target = labels[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
    return per_token[target != IGNORE]                                       # (N,)
