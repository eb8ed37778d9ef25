"""PARADE / PARA: prompt-aware scaling vectors on Q, V and the FFN Up activations.

PARADE eqs. (4)-(5): Q' = l_q * Q, V' = l_v * V, U' = l_u * U, with the
vectors from one `VectorGenerator` per layer reading that layer's input over
the prompt. Implementation with hooks, one mechanism for every architecture:

* a pre-hook on the backbone decides per forward call: a call that starts a
  sequence (no cached tokens) is a *prefill* and computes fresh vectors; a call
  that continues a KV cache is a *decode* step and reuses them;
* a pre-hook on each decoder layer runs that layer's generator at prefill;
* a forward hook on each scaled module multiplies its output by the vectors
  (for fused QKV modules, only the role's slice; role_scaling.py); on a non-gated FFN (GPT-2,
  GPT-NeoX) `up` scales the activation's output, the input of `down`
  (architectures.role_sites, our reading of eq. 5).

Vectors are per batch row. `generate` and `forward` drop them when they return,
so they never outlive their request. Beam search expands each prompt before
prefill, so every beam of a prompt carries its prompt's vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from papeft.backbone.architectures import LINEAR_ROLES, ROLE_PATHS, decoder_layers, full_width, model_type, role_sites
from papeft.config_checks import at_least, one_of, role_names
from papeft.methods.base import AdaptedModel, register_method
from papeft.methods.role_scaling import hook_role_sites, scale_rows
from papeft.methods.serving_form import PromptVectors
from papeft.methods.vector_generator import ACTIVATIONS, POOLERS, VectorGenerator, make_activation, make_pooler


@dataclass
class PromptAwareConfig:
    r: int = 12                                  # bottleneck
    num_capsules: int = 4                        # K (capsule and routing poolers only)
    pooler: str = "capsule"                      # capsule | routing | last | mean
    activation: str = "gelu"                     # gelu | relu | tanh | identity | rational
    targets: list[str] = field(default_factory=lambda: ["q", "v", "up"])
    skip_absent_targets: bool = False            # drop targets the architecture lacks (GPT-2 has no gate)

    CHECKS: ClassVar[dict] = {"r": at_least(1), "num_capsules": at_least(1), "pooler": one_of(*POOLERS),
                              "activation": one_of(*ACTIVATIONS), "targets": role_names(LINEAR_ROLES)}


def _rows(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Fit a (b, t) prompt mask to a (batch, length) input: beam rows repeat, later tokens are not prompt."""
    if mask.shape[0] != batch:
        if batch % mask.shape[0]:
            raise ValueError(f"prompt mask has {mask.shape[0]} rows, input has {batch}")
        mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
    if mask.shape[1] < length:
        mask = torch.cat([mask, mask.new_zeros(batch, length - mask.shape[1])], dim=1)
    return mask[:, :length].bool()


class PromptAwareModel(AdaptedModel):
    def __init__(self, model: nn.Module, config: PromptAwareConfig, method: str):
        super().__init__(model, method, config)
        targets = list(config.targets)
        if config.skip_absent_targets:     # a known role this architecture lacks; typos still fail below
            targets = [t for t in targets if t in ROLE_PATHS[model_type(model)] or t not in LINEAR_ROLES]
        self.sites = role_sites(model, targets, scaling=True)
        d = model.config.hidden_size
        widths = {s.role: s.width for s in self.sites}
        self.generators = nn.ModuleList(
            VectorGenerator(d, config.r, widths,
                            make_pooler(config.pooler, config.r, config.num_capsules),
                            make_activation(config.activation))
            for _ in decoder_layers(model))
        self._prompt_mask: torch.Tensor | None = None   # set by forward/generate for the call
        self._pool_mask: torch.Tensor | None = None     # (B, T) mask of this prefill
        self._vectors: list[dict[str, torch.Tensor] | None] | None = None
        self._install_hooks()

    # ---- hooks -----------------------------------------------------------
    def _install_hooks(self) -> None:
        backbone = self.backbone.base_model
        backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True)
        for i, layer in enumerate(decoder_layers(self.model)):
            layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True)
        hook_role_sites(self.model, self.sites, self._make_scale_hook)

    def _on_backbone(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:       # decode step: reuse
            if self._vectors is None:
                raise RuntimeError("decode step without prompt vectors: start with a prefill call")
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        B, T = ref.shape[:2]
        mask = self._prompt_mask if self._prompt_mask is not None else kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(B, T, dtype=torch.bool, device=ref.device)
        self._pool_mask = _rows(mask.to(ref.device), B, T)
        self._vectors = [None] * len(self.generators)

    def _make_layer_hook(self, i: int):
        def hook(layer, args, kwargs):
            if self._vectors is not None and self._vectors[i] is None:
                h = args[0] if args else kwargs["hidden_states"]          # (B, T, d)
                self._vectors[i] = self.generators[i](h, self._pool_mask)
        return hook

    def _make_scale_hook(self, i: int, sites):
        def scale(x):                                                        # (B, T, width)
            vecs = self._vectors[i] if self._vectors is not None else None
            if vecs is None:
                raise RuntimeError("scaled module ran before its layer's vector generator")
            return scale_rows(x, full_width(sites, vecs, x.shape[-1], 1.0).to(x.dtype)[:, None, :])  # (B, 1, width)
        return scale

    # ---- calls -----------------------------------------------------------
    def _clear(self) -> None:
        self._prompt_mask = self._pool_mask = self._vectors = None

    def _with_prompt(self, prompt_mask, call):
        """Run `call` with this prompt mask; vectors are dropped when it returns, whatever happens."""
        self._prompt_mask = prompt_mask
        try:
            return call()
        finally:
            self._clear()

    def forward(self, input_ids, attention_mask=None, labels=None, prompt_mask=None, **kw):
        """Teacher-forced forward; pools over `prompt_mask` (defaults to every attended token)."""
        if prompt_mask is not None and attention_mask is not None:
            prompt_mask = prompt_mask.bool() & attention_mask.bool()
        return self._with_prompt(prompt_mask, lambda: self.model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **gen_kwargs):
        """The whole input is the prompt; vectors come from prefill and serve every decode step."""
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
        return self._with_prompt(mask, lambda: self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs))

    @torch.no_grad()
    def prompt_vectors(self, input_ids, attention_mask=None, prompt_mask=None) -> list[dict]:
        """Each layer's vectors for these prompts, {role: (B, width)} per layer (inspection, tests)."""
        def call():
            self.model(input_ids=input_ids, attention_mask=attention_mask)
            return self._vectors
        return self._with_prompt(prompt_mask, call)

    def serving_form(self, backbone: nn.Module) -> PromptVectors:
        """The generators, run by the server at prefill for every row of this tenant."""
        return PromptVectors(self.generators, self.sites)


@register_method("parade", PromptAwareConfig)
@register_method("para", PromptAwareConfig)
def apply_prompt_aware(model: nn.Module, config: PromptAwareConfig, name: str) -> PromptAwareModel:
    return PromptAwareModel(model, config, name)
