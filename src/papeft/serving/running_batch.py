"""The rows in flight of the iteration-level batcher: one KV cache, and each row's own adapter.

A `RunningBatch` is made by a prefill (`prefill`: newcomers' prompts through the engine's
call hooks, so every row gets its tenant's vectors, scales, LoRA weights or soft prompt
exactly as in `MultiTenantEngine.generate`), grows when newcomers join (`extend`), loses or
reorders rows (`select`: finished requests leave, beams are reordered) and runs one decode
step for all its rows at once (`step`). What a row needs at decode time is kept per row:

    cache      per layer keys / values          (B, H, L, D)   left-padded
    mask       attention mask                    (B, L)         0 on padding
    positions  next position of each row         (B,)           = real tokens so far
    scales     site -> scale                     (B, 1, W)      1 on rows without one
    lora       bank -> (layer, path) -> (A, B)   (B, in, r), (B, r, out)   0 on rows without
    names      peft adapter name of each row     "__base__" on rows without

Joining left-pads the shorter side's cache and mask to the longer one's length: a padded
key is masked, so each row attends to exactly its own tokens at its own positions (the
positions transformers' `generate` derives from the mask), and its logits do not depend
on who else is in the batch (float rounding of batched kernels aside). When rows leave,
columns that are padding for every remaining row are cut (`compact`).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from papeft.serving.engine import CallHooks
from papeft.serving.forwards import PatchedForwards, scaled_forward
from papeft.serving.gathered_lora import lora_forward

def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """t with n zeros prepended along dim (dim -2 of a (B, H, L, D) cache, dim 1 of a (B, L) mask)."""
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [n, 0]
    return F.pad(t, pad)


def _join(a: torch.Tensor | None, b: torch.Tensor | None, na: int, nb: int, like: torch.Tensor, fill: float):
    """Rows of a (na) then b (nb); a side without the tensor gets rows of `fill` shaped like `like`."""
    a = like.new_full((na, *like.shape[1:]), fill) if a is None else a
    b = like.new_full((nb, *like.shape[1:]), fill) if b is None else b
    return torch.cat([a, b])


class RunningBatch:
    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor,
                 scales: dict, lora: dict, names: list[str]):
        self.cache, self.mask, self.positions = cache, mask, positions
        self.scales, self.lora, self.names = scales, lora, names

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        """Cached positions per row, padding included (L)."""
        return self.mask.shape[1]

    @classmethod
    @torch.no_grad()
    def prefill(cls, engine, rows: list[tuple]) -> tuple["RunningBatch", torch.Tensor]:
        """Prompts `rows` [(ids, tenant, soft prompt)] -> (their batch, last-token logits (P, V))."""
        inputs = engine.batch_inputs(rows)
        mask = inputs["attention_mask"]                                          # (P, T)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)              # as generate derives them
        tenants = [t for _, t, _ in rows]
        names = engine.peft_names(tenants)
        model, routing = engine.route(names)
        cache = DynamicCache()
        with CallHooks(engine, tenants, mask, 1) as call:
            out = model(**inputs, position_ids=positions, use_cache=True, **{_cache_kw(engine.backbone): cache},
                        **routing, **_last_logits_only(engine.backbone))
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise NotImplementedError(f"iteration-level batching joins plain KV caches (DynamicLayer); "
                                      f"this backbone's cache has {kinds}")
        lora = {bank: dict(gathered) for bank, gathered in call.lora.items()}
        batch = cls(cache, mask, positions[:, -1] + 1, dict(call.scales), lora, names)
        return batch, out.logits[:, -1]                                          # (P, V)

    def extend(self, other: "RunningBatch") -> None:
        """Append `other`'s rows after this batch's, left-padding the shorter cache."""
        na, nb, L = len(self), len(other), max(self.length, other.length)
        for la, lb in zip(self.cache.layers, other.cache.layers):
            la.keys = torch.cat([_pad_left(la.keys, L - self.length, -2), _pad_left(lb.keys, L - other.length, -2)])
            la.values = torch.cat([_pad_left(la.values, L - self.length, -2),
                                   _pad_left(lb.values, L - other.length, -2)])
        self.mask = torch.cat([_pad_left(self.mask, L - self.length, 1), _pad_left(other.mask, L - other.length, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        for site in self.scales.keys() | other.scales.keys():
            like = self.scales.get(site, other.scales.get(site))
            self.scales[site] = _join(self.scales.get(site), other.scales.get(site), na, nb, like, 1.0)
        for bank in self.lora.keys() | other.lora.keys():
            mine, theirs = self.lora.get(bank, {}), other.lora.get(bank, {})
            joined = {}
            for key in mine.keys() | theirs.keys():
                pair_a, pair_b = mine.get(key, (None, None)), theirs.get(key, (None, None))
                like = theirs[key] if key in theirs else mine[key]
                joined[key] = tuple(_join(a, b, na, nb, lk, 0.0) for a, b, lk in zip(pair_a, pair_b, like))
            self.lora[bank] = joined
        self.names = self.names + other.names

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (b,) in that order (a row may repeat: the beams of one prompt)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        self.mask, self.positions = self.mask.index_select(0, rows), self.positions.index_select(0, rows)
        self.scales = {site: s.index_select(0, rows) for site, s in self.scales.items()}
        self.lora = {bank: {key: (A.index_select(0, rows), B.index_select(0, rows)) for key, (A, B) in g.items()}
                     for bank, g in self.lora.items()}
        self.names = [self.names[r] for r in rows.tolist()]
        self.compact()

    def compact(self) -> None:
        """Cut the leading columns that are padding on every row."""
        if not len(self):
            return
        cut = int((self.mask.cumsum(-1) == 0).sum(-1).min())                     # leading zeros shared by all
        if cut:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
            self.mask = self.mask[:, cut:]

    @torch.no_grad()
    def step(self, engine, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: each row's next input token (B,) -> its logits (B, V)."""
        B = len(self)
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], dim=1)      # (B, L + 1)
        layers, patched = engine.layers, PatchedForwards()
        for (i, path, side), s in self.scales.items():
            patched.patch(layers[i].get_submodule(path), lambda base: scaled_forward(base, s, side))
        for gathered in self.lora.values():
            for (i, path), (A, Bw) in gathered.items():
                patched.patch(layers[i].get_submodule(path), lambda base: lora_forward(base, A, Bw))
        model, routing = engine.route(self.names)
        try:
            out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                        use_cache=True, **{_cache_kw(engine.backbone): self.cache}, **routing)
        finally:
            patched.restore()
        self.positions = self.positions + 1
        return out.logits[:, -1]                                                  # (B, V)


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    """A model class's forward arguments (read once per class, not at every decode step)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_kw(model) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def _last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the model takes it (generate's prefill asks for the last position only)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(type(model)) else {}
