"""Prompt learning through peft: prompt tuning, P-tuning and P-tuning v2 (prefix tuning), one module.

`kind` picks the peft method:

* `prompt_tuning`  (Lester et al. 2021, peft `PromptTuningConfig`): m virtual token
  embeddings Z (m, d) are prepended to the input embeddings: X = [Z; E(x)].
* `p_tuning`       (Liu et al. 2021, peft `PromptEncoderConfig`): the same, but Z is the
  output of a learnable encoder. PARADE App. E: "soft prompts first initialized with
  dimension 36, then a learnable projection layer projects to the backbone's width".
  peft's encoder always stores its tokens at width d (an MLP d -> h -> h -> d), so
  `projection_dim: 36` swaps it for `ProjectedPrompt`: Z = E_36 W + b, E_36 (m, 36), W (36, d).
  `projection_dim: null` keeps peft's MLP encoder.
* `prefix_tuning`  (P-tuning v2, Li & Liang 2021 / Liu et al. 2022, peft `PrefixTuningConfig`):
  m key/value vectors per layer are prepended inside attention (a KV cache that holds
  m virtual positions before the input). `projection_dim: k` stores the prefix as
  (m, k) and lifts it with one Linear to all layers' keys and values (our reading of
  the paper's 9.4M, see below); `null` is peft's plain prefix (L * 2 * m * d_kv).

Why not peft's own forward/generate: peft 0.21.2 looks for `past_key_values` where
transformers 5 passes `cache`, so its `generate` re-injects the soft prompt at every
decoding step (and drops the attention mask), and for prefix tuning hands the model two
caches. We take from peft the configs, the prompt encoders and `get_prompt` (the
virtual tokens / prefix cache for a batch), and build the backbone inputs here, the same
way in `forward` and in `generate`. Logits come back aligned with `input_ids`.

Parameter budgets on LLaMA-2 7B (PARADE Table 1 says 9.4M for both; 9.4M =
32 x 2 x 36 x 4096, the budget the paper gives most adapters): P-tuning with the
36-dim projection has 64*36 + 36*4096 = 149,760 weights (+4,096 bias), far below 9.4M:
the description cannot produce that count. P-tuning v2 with peft's plain prefix has
32 x 2 x 64 x 4096 = 16.8M; with the 36-dim prefix lifted to every layer's K and V it has
64*36 + 36*262,144 = 9,439,488 weights ("9.4M"), our reading of the paper's setting.

Our readings: prompt tuning starts from 64 embeddings of randomly sampled vocabulary
tokens (peft `SAMPLE_VOCAB`, Lester et al.'s recommended init); PyTorch default inits
elsewhere, as in peft's encoders; 64 virtual tokens for every kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from torch import nn

from papeft.methods.base import AdaptedModel, register_method

KINDS = ("prompt_tuning", "p_tuning", "prefix_tuning")
PROMPT_TUNING_INITS = ("sample_vocab", "random")


@dataclass
class PromptLearningConfig:
    kind: str = "prompt_tuning"              # prompt_tuning | p_tuning | prefix_tuning
    num_virtual_tokens: int = 64             # m (prefix_tuning: per layer)
    projection_dim: int | None = None        # p_tuning / prefix_tuning: store tokens in k dims, lift with a Linear
    init: str = "sample_vocab"               # prompt_tuning only: sample_vocab | random

    def __post_init__(self) -> None:
        _check(self)                         # when the config is read, before any model is loaded


class ProjectedPrompt(nn.Module):
    """m virtual tokens stored in k dimensions and lifted by one learnable Linear (PARADE App. E).

    Stands in for a peft prompt encoder: peft's `get_prompt` calls it on token indices
    (B, m) and reads `.embedding.weight` for the device.
    """

    def __init__(self, num_tokens: int, dim: int, out_features: int):
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, dim)      # (m, k)
        self.lift = nn.Linear(dim, out_features)            # k -> d (P-tuning) or L*2*d_kv (prefix)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.lift(self.embedding(indices))           # (B, m, out)


def _check(config: PromptLearningConfig) -> None:
    if config.kind not in KINDS:
        raise ValueError(f"method.kind='{config.kind}' is not one of {KINDS}")
    if not isinstance(config.num_virtual_tokens, int) or config.num_virtual_tokens < 1:
        raise ValueError(f"method.num_virtual_tokens={config.num_virtual_tokens!r}: expected an integer >= 1")
    if config.projection_dim is not None:
        if config.kind == "prompt_tuning":
            raise ValueError("method.projection_dim is for kind p_tuning or prefix_tuning; "
                             "prompt_tuning learns its virtual tokens directly (set projection_dim: null)")
        if not isinstance(config.projection_dim, int) or config.projection_dim < 1:
            raise ValueError(f"method.projection_dim={config.projection_dim!r}: expected an integer >= 1 or null")
    if config.init not in PROMPT_TUNING_INITS:
        raise ValueError(f"method.init='{config.init}' is not one of {PROMPT_TUNING_INITS}")


def _peft_config(config: PromptLearningConfig):
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens)
    if config.kind == "prompt_tuning":
        return PromptTuningConfig(prompt_tuning_init=config.init.upper(), **common)
    if config.kind == "p_tuning":      # with a projection, peft's MLP is replaced: keep the throwaway tiny
        hidden = 1 if config.projection_dim is not None else None
        return PromptEncoderConfig(encoder_reparameterization_type="MLP", encoder_hidden_size=hidden, **common)
    return PrefixTuningConfig(prefix_projection=False, **common)


def ones_before(mask: torch.Tensor, m: int) -> torch.Tensor:
    """(B, T) attention mask -> (B, m + T): the m virtual positions are always attended."""
    return torch.cat([mask.new_ones(mask.shape[0], m), mask], dim=1)


class SoftPromptModel(AdaptedModel):
    """Methods that prepend m virtual token embeddings to the input: X = [Z; E(x)].

    Subclasses define `soft_prompt` (B, m, d). `forward` drops the m virtual positions
    from the logits (inside `logits_only_at` the LM head never sees them); `generate` prepends Z once and returns input_ids + new tokens.
    """

    def soft_prompt(self, input_ids, attention_mask, prompt_mask) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def request_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """One request's prompt ids (T,), all of them prompt -> its soft prompt (m, d)."""
        x = ids[None]
        return self.soft_prompt(x, torch.ones_like(x), torch.ones_like(x))[0]

    def _inputs(self, input_ids, attention_mask, prompt_mask):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        z = self.soft_prompt(input_ids, attention_mask, prompt_mask)            # (B, m, d)
        tokens = self.backbone.get_input_embeddings()(input_ids)                # (B, T, d)
        embeds = torch.cat([z.to(tokens.dtype), tokens], dim=1)                  # (B, m + T, d)
        return embeds, ones_before(attention_mask, z.shape[1]), z.shape[1]

    def forward(self, input_ids, attention_mask=None, labels=None, prompt_mask=None, **kw):
        embeds, mask, m = self._inputs(input_ids, attention_mask, prompt_mask)
        if labels is not None:                                                   # virtual positions: no loss
            labels = torch.cat([labels.new_full((labels.shape[0], m), -100), labels], dim=1)
        kw.pop("position_ids", None)     # positions count the virtual tokens; let the backbone number them
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kw)
        if self.logit_positions is None:                                         # else (N, V) already
            out.logits = out.logits[:, m:]                                       # (B, T, V)
        return out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **gen_kwargs):
        """The whole attended input is the prompt; Z is computed once, before decoding."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, mask, _ = self._inputs(input_ids, attention_mask, attention_mask)
        new = self.backbone.generate(inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)  # (B', n) new only
        rows = new.shape[0] // input_ids.shape[0]                                # num_return_sequences
        return torch.cat([input_ids.repeat_interleave(rows, dim=0), new], dim=1)  # (B', T + n)


class PeftSoftPromptModel(SoftPromptModel):
    """Prompt tuning and P-tuning: one Z for every instance, from peft's prompt encoder."""

    def soft_prompt(self, input_ids, attention_mask, prompt_mask) -> torch.Tensor:
        return self.model.get_prompt(batch_size=input_ids.shape[0])             # (B, m, d)


class PrefixModel(AdaptedModel):
    """P-tuning v2: peft's prefix cache holds m virtual keys/values in every layer before the input.

    Positions of the real tokens start at m (the backbone counts the cached prefix), as in peft.
    """

    def _prefix(self, batch_size: int):
        return self.model.get_prompt(batch_size=batch_size)                       # Cache, m positions per layer

    def forward(self, input_ids, attention_mask=None, labels=None, prompt_mask=None, **kw):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        m = self.model.active_peft_config.num_virtual_tokens
        kw.pop("cache", None)
        kw.pop("past_key_values", None)
        return self.backbone(input_ids=input_ids, attention_mask=ones_before(attention_mask, m),
                             labels=labels, cache=self._prefix(input_ids.shape[0]), **kw)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **gen_kwargs):
        """generate() continues from the prefix cache: an attention mask longer than input_ids
        tells transformers that the cache holds positions the ids do not (no re-slicing)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        m = self.model.active_peft_config.num_virtual_tokens
        beams = gen_kwargs.get("num_beams") or self.backbone.generation_config.num_beams or 1
        rows = beams if beams > 1 else (gen_kwargs.get("num_return_sequences") or 1)
        # generate() expands input_ids per beam (repeat_interleave) but not a user cache: size it here;
        # every row of the prefix is the same, so the row order does not matter
        return self.backbone.generate(input_ids=input_ids, attention_mask=ones_before(attention_mask, m),
                                      cache=self._prefix(input_ids.shape[0] * rows), **gen_kwargs)


@register_method("prompt_learning", PromptLearningConfig)
def apply_prompt_learning(model: nn.Module, config: PromptLearningConfig, name: str) -> AdaptedModel:
    peft_model = get_peft_model(model, _peft_config(config))
    pc = peft_model.active_peft_config          # peft filled in token_dim, num_layers (and KV heads for GQA)
    if config.projection_dim is not None:
        width = pc.token_dim if config.kind == "p_tuning" else pc.num_layers * 2 * pc.token_dim
        device = peft_model.prompt_encoder["default"].embedding.weight.device
        peft_model.prompt_encoder["default"] = ProjectedPrompt(
            config.num_virtual_tokens, config.projection_dim, width).to(device)
    cls = PrefixModel if config.kind == "prefix_tuning" else PeftSoftPromptModel
    return cls(peft_model, name, config)
