"""AdaLoRA through peft (Zhang et al. 2023), targeted by roles like LoRA.

Each target linear gets an SVD-shaped update  W + B diag(E) A  (peft's SVDLinear:
A (r, in), E (r, 1), B (out, r)); AdaLoRA eq. (1). During training the rank budget
shrinks on a cubic schedule (eq. 8) from `init_r` per module to `target_r` per module
on average, pruning the (A row, E entry, B column) triplets with the lowest smoothed
sensitivity x uncertainty scores (eqs. 5-7) by zeroing their E entry; the loss carries
the orthogonality regulariser R(A, B) = |A A^T - I|_F + |B^T B - I|_F (eq. 4).

PARADE App. E: "initial rank at each module is set to 8, and half of the rank budget
is pruned": init_r=8, target_r=4 on all seven linears.

Our readings:
* peft needs the schedule in steps before training starts; the trainer announces the
  planned step count in `on_train_begin`, and tinit / tfinal / deltaT are fractions of it
  (warm-up 10%, final fine-tuning at the fixed budget 30%, reallocation every 1%), in
  the spirit of the AdaLoRA paper's GLUE settings.
* The trainer computes the loss from the logits, so peft's `forward` never sees labels
  and would skip the regulariser. It enters as `step_regularizer`: the trainer adds
  orth_reg_weight * R once per optimizer step, whatever the micro-batch size (peft adds it
  to each forward's loss, i.e. once per step without gradient accumulation), so the
  micro-batch size only controls memory.
* alpha and dropout are peft's defaults (alpha 8, so the update is scaled by 8 / ranknum).

Parameter count: peft's trainable tensors are A, B and E at the initial rank; `ranknum`
(the initial rank as a float, the update's divisor) is a frozen parameter and not counted.
Pruning zeroes E entries but never removes parameters, so the count is that of rank 8:
8 x (in + out + 1) per module, 19,990,272 on LLaMA-2 7B. The paper's 10.0M is the budget
left after pruning: mean rank 4, about half (exactly half only if every module keeps 4; the
surviving ranks go to the modules that need them), the same as LoRA r=4 (9.99M).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from papeft.backbone.architectures import LINEAR_ROLES, lora_target_modules, model_type, resolve_targets
from papeft.config_checks import above, at_least, between, role_names
from papeft.methods.base import AdaptedModel, register_method


@dataclass
class AdaLoraMethodConfig:
    init_r: int = 8
    target_r: int = 4                 # mean rank per module after pruning (half the budget)
    tinit_fraction: float = 0.1       # steps at the full budget before pruning starts
    tfinal_fraction: float = 0.3      # steps at the final budget at the end
    delta_t_fraction: float = 0.01    # interval between reallocations (at least one step)
    beta1: float = 0.85               # EMA of sensitivity (peft default)
    beta2: float = 0.85               # EMA of uncertainty (peft default)
    orth_reg_weight: float = 0.5      # peft default
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LINEAR_ROLES))

    CHECKS: ClassVar[dict] = {
        "init_r": at_least(1), "target_r": at_least(1), "beta1": between(0, 1, high_open=True),
        "beta2": between(0, 1, high_open=True), "orth_reg_weight": at_least(0.0), "alpha": above(0.0),
        "dropout": between(0, 1, high_open=True), "targets": role_names(LINEAR_ROLES)}

    def __post_init__(self) -> None:
        _check(self)          # across keys, when the config is read


def _check(config: AdaLoraMethodConfig) -> None:
    if not 0 < config.target_r <= config.init_r:
        raise ValueError(f"method.target_r={config.target_r} must be in 1..init_r ({config.init_r})")
    for key in ("tinit_fraction", "tfinal_fraction", "delta_t_fraction"):
        if not 0.0 <= getattr(config, key) < 1.0:
            raise ValueError(f"method.{key}={getattr(config, key)} must be in [0, 1)")
    if config.tinit_fraction + config.tfinal_fraction >= 1.0:
        raise ValueError(f"method.tinit_fraction + method.tfinal_fraction = "
                         f"{config.tinit_fraction + config.tfinal_fraction} leaves no steps to prune in; expected < 1")
    if config.orth_reg_weight < 0:
        raise ValueError(f"method.orth_reg_weight={config.orth_reg_weight} must be >= 0")


class AdaLoraModel(AdaptedModel):
    @property
    def tuner(self):
        """peft's AdaLoraModel: holds the rank allocator and `update_and_allocate`."""
        return self.model.base_model

    @property
    def peft_config(self) -> AdaLoraConfig:
        return self.model.peft_config["default"]

    def on_train_begin(self, total_steps: int) -> None:
        """Fix AdaLoRA's schedule to the planned number of optimizer steps."""
        c, pc = self.config, self.peft_config
        if total_steps < 3:
            raise ValueError(f"AdaLoRA needs at least 3 training steps to prune in, the trainer plans {total_steps}")
        pc.total_step = total_steps
        pc.tinit = int(c.tinit_fraction * total_steps)
        pc.tfinal = int(c.tfinal_fraction * total_steps)
        if pc.tinit >= total_steps - pc.tfinal:       # too few steps to honour both fractions
            pc.tinit, pc.tfinal = 0, 0
        pc.deltaT = max(1, int(c.delta_t_fraction * total_steps))
        self.tuner.rankallocator.reset_ipt()

    def on_step_end(self, step: int) -> None:
        """After optimizer.step, before zero_grad: update importance scores, prune to the budget."""
        if self.peft_config.total_step is None or self.peft_config.total_step < 3:
            raise RuntimeError("AdaLoRA: call on_train_begin(total_steps) before training")
        self.tuner.update_and_allocate(step)

    def orthogonality_loss(self) -> torch.Tensor:
        """R(A, B) of AdaLoRA eq. (4), averaged over the A and B matrices (as peft does)."""
        terms = []
        for name, p in self.model.named_parameters():
            if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
                gram = p @ p.T if ".lora_A." in name else p.T @ p            # (r, r)
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye))           # Frobenius
        return torch.stack(terms).mean()

    def step_regularizer(self) -> torch.Tensor | None:
        """orth_reg_weight x R(A, B), once per optimizer step (eq. 4's term in the training objective)."""
        if self.config.orth_reg_weight == 0:
            return None
        return self.config.orth_reg_weight * self.orthogonality_loss()

    # ---- state outside the trainable weights, for resumable training (papeft.train.checkpoint) ----
    SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")    # RankAllocator dicts: name -> tensor like the weight

    def resume_state(self) -> dict[str, torch.Tensor]:
        """The rank allocator's smoothed importance scores and the current rank pattern."""
        alloc, state = self.tuner.rankallocator, {}
        for kind in self.SCORES:
            state.update({f"{kind}.{n}": t for n, t in getattr(alloc, kind).items()})
        for n, keep in self.rank_pattern().items():
            state[f"rank_pattern.{n}"] = torch.as_tensor(keep, dtype=torch.bool)
        return state

    def load_resume_state(self, state: dict[str, torch.Tensor]) -> None:
        alloc = self.tuner.rankallocator
        alloc.reset_ipt()
        pattern = {}
        for key, tensor in state.items():
            kind, name = key.split(".", 1)
            if kind == "rank_pattern":
                pattern[name] = tensor.tolist()
            elif kind in self.SCORES:
                getattr(alloc, kind)[name] = tensor.clone()
            else:
                raise ValueError(f"AdaLoRA resume state: unexpected entry '{key}'")
        self.peft_config.rank_pattern = pattern or None

    def rank_pattern(self) -> dict[str, list[bool]]:
        """Which triplets survive, per module (empty before the first pruning step)."""
        return dict(self.peft_config.rank_pattern or {})


@register_method("adalora", AdaLoraMethodConfig)
def apply_adalora(model: nn.Module, config: AdaLoraMethodConfig, name: str) -> AdaptedModel:
    roles = resolve_targets(model, list(config.targets))
    peft_config = AdaLoraConfig(
        init_r=config.init_r, target_r=config.target_r, beta1=config.beta1, beta2=config.beta2,
        orth_reg_weight=config.orth_reg_weight, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=lora_target_modules(model, roles), task_type="CAUSAL_LM",
        fan_in_fan_out=model_type(model) == "gpt2",     # GPT-2 stores its linears as Conv1D (in, out)
        total_step=1)                 # placeholder: the real schedule is set in on_train_begin
    return AdaLoraModel(get_peft_model(model, peft_config), name, config)
