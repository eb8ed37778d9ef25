"""One frozen backbone, many tenants, mixed in one batch: `MultiTenantEngine`.

    engine = MultiTenantEngine(backbone)                 # lora_backend="gathered" | "peft"
    engine.add_tenant("acme", "runs/.../adapter")        # PARADE, PARA, PEDRO, (IA)3, LoRA, LoPA
    results = engine.generate([Request(ids, "acme"), Request(ids2, "zeta"), Request(ids3)], num_beams=3)

How each kind of row is served (hooks and patched forwards installed for the call only, removed after):
* vector tenants (PARADE / PARA / PEDRO): at prefill a pre-hook on each decoder
  layer runs the generators of all rows at once with their own gathered weights
  (tenants.VectorBank: bmm over (B, d, r) and (B, r, W); capsule and rational
  parameters gathered per row, see tenants.per_row) and writes the rows' vectors into per-module scale
  tensors (P, 1, width), one row per prompt. The layer pre-hooks are removed once
  the prefill forward returns: a decode step runs only `out *= scale` per scaled
  module (its forward patched for the call, restored after). Beam search expands
  each prompt into adjacent rows before prefill; the generators run once per
  prompt and its beams share its scales (folded into the token axis), so every
  beam carries its prompt's vectors.
* static-scale tenants ((IA)3, ours and peft's): their vectors are gathered into
  the same scale tensors when the call starts.
* LoRA, `lora_backend="gathered"`: gathered_lora (BGMV-style, one gather per call);
  `lora_backend="peft"`: tenants are named adapters of a peft wrapper and rows
  are routed with peft's mixed batch (`generate(adapter_names=[...])`).
* soft prompts (LoPA): a LoPA tenant's encoder makes each of its requests' (m, d)
  soft prompt when the call starts (or a request brings its own `soft_prompt`);
  it is prepended to that row's input embeddings (the whole batch then goes
  through `inputs_embeds`).
Rows of other kinds see a scale of exactly 1 and a LoRA delta of exactly 0, and
tenants of one structure share a bank, so a batch costs one pass per bank, not per tenant.

Refusals (our reading of "the rest of the batch is not affected"): `add_tenant`
raises `TenantError` for a bad adapter (unknown method, another backbone,
corrupt file) and remembers why; `generate` validates every request first,
answers invalid ones (unknown or refused tenant, empty prompt, token ids out of
the vocabulary, a malformed soft prompt) with a `Result` carrying `error`, and
generates the valid ones together. Left padding: HF generate derives positions
from the attention mask and padding never enters a pool, so a row's tokens are
the same alone or in any batch (greedy, same dtype; float rounding of batched
kernels aside).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from papeft.backbone.architectures import ROLE_PATHS, decoder_layers, model_type, module_width, role_sites
from papeft.serving.gathered_lora import LoraBank, lora_forward
from papeft.serving.tenants import (LoraTenant, SoftPromptTenant, StaticBank, Tenant, TenantError, VectorBank,
                                    load_tenant)


@dataclass
class Request:
    input_ids: list[int] | torch.Tensor        # the prompt's token ids (chat template applied)
    tenant: str | None = None                  # None: the bare backbone
    soft_prompt: torch.Tensor | None = None    # (m, d) prefix embeddings travelling with the request (LoPA)


@dataclass
class Result:
    tenant: str | None
    tokens: list[int] | None                   # new tokens, cut after the first end token
    error: str | None = None
    score: float | None = None                 # with generate(return_scores=True)

    @property
    def ok(self) -> bool:
        return self.error is None


BANKS = {"vector": VectorBank, "static": StaticBank, "lora": LoraBank}


class MultiTenantEngine:
    def __init__(self, backbone: nn.Module, lora_backend: str = "gathered", tokenizer=None):
        if lora_backend not in ("gathered", "peft"):
            raise ValueError(f"lora_backend='{lora_backend}'; expected gathered | peft")
        self.backbone = backbone.eval().requires_grad_(False)
        self.lora_backend = lora_backend
        self.tokenizer = tokenizer               # only LoPA with `encoder: minilm` needs it (ids -> text)
        self.layers = decoder_layers(backbone)
        p = next(backbone.parameters())
        self.device, self.dtype = p.device, p.dtype
        roles = list(ROLE_PATHS[model_type(backbone)])
        # where each role's scaling vector acts (non-gated FFNs: `up` on the input of `down`); before any peft wrap
        self.sites = {s.role: s for s in role_sites(backbone, roles, scaling=True)}
        self.widths = {(path, side): module_width(self.layers[0].get_submodule(path), side)
                       for path in set(ROLE_PATHS[model_type(backbone)].values()) for side in ("out", "in")}
        self.tenants: dict[str, Tenant] = {}
        self.refused: dict[str, str] = {}        # tenant name -> why its adapter was refused
        self.banks: dict[tuple, object] = {}     # (kind, signature) -> bank
        self._bank_of: dict[str, tuple] = {}
        self._peft = None                        # peft wrapper (lora_backend="peft")
        gen = backbone.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else backbone.config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        pad = gen.pad_token_id if gen.pad_token_id is not None else min(self.eos, default=0)
        self.pad = pad if 0 <= pad < backbone.get_input_embeddings().num_embeddings else 0   # masked anyway

    # ---- registry -------------------------------------------------------------
    def add_tenant(self, name: str, directory: str | Path) -> Tenant:
        """Load a tenant next to the loaded ones; raises TenantError (and remembers it) if refused."""
        if name in self.tenants:
            raise TenantError(f"tenant '{name}' is already loaded; remove it first")
        try:
            tenant = load_tenant(name, directory, self.backbone, self.tokenizer)
            try:
                self._place(name, tenant)
            except TenantError:
                raise
            except Exception as e:  # noqa: BLE001  (a tenant that does not fit is refused; the others stay)
                raise TenantError(f"{directory}: cannot place tenant '{name}': {type(e).__name__}: {e}") from e
            if not isinstance(tenant, SoftPromptTenant):     # weights now live in a bank (or peft): keep a record
                tenant = Tenant(name, tenant.method, tenant.directory, tenant.kind)
            self.tenants[name] = tenant
            self._probe(name, directory)
        except TenantError as e:
            self.refused[name] = str(e)
            raise
        self.refused.pop(name, None)
        return tenant

    def _place(self, name: str, tenant: Tenant) -> None:
        """Put a loaded tenant's weights where batches read them: peft, or the bank of its layout."""
        if tenant.kind == "lora" and self.lora_backend == "peft":
            self._peft_add(tenant)
        elif tenant.kind in BANKS:
            cls = BANKS[tenant.kind]
            key = (tenant.kind, cls.signature(tenant))
            if key not in self.banks:
                self.banks[key] = cls.for_tenant(tenant)
            self.banks[key].add(tenant)
            self._bank_of[name] = key

    def _probe(self, name: str, directory: str | Path) -> None:
        """One short prompt through the new tenant: outputs that are not finite refuse it (and undo the add)."""
        vocab = self.backbone.get_input_embeddings().num_embeddings
        try:
            finite = bool(torch.isfinite(self.logits([Request([i % vocab for i in range(1, 9)], name)])[0]).all())
            why = "its outputs on a probe prompt are not finite"
        except Exception as e:  # noqa: BLE001
            finite, why = False, f"a probe prompt fails: {type(e).__name__}: {e}"
        if not finite:
            self.remove_tenant(name)
            raise TenantError(f"{directory}: {why}; its weights would make every answer meaningless")

    def remove_tenant(self, name: str) -> None:
        if name not in self.tenants:
            raise TenantError(f"tenant '{name}' is not loaded")
        tenant = self.tenants.pop(name)
        key = self._bank_of.pop(name, None)
        if key is not None:
            bank = self.banks[key]
            bank.stack.remove(name)
            if not len(bank.stack):
                del self.banks[key]
        elif tenant.kind == "lora":
            self._peft.delete_adapter(name)

    def _peft_add(self, t: LoraTenant) -> None:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=t.rank, lora_alpha=t.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                         target_modules=sorted({path for _, path in t.weights}))
        if self._peft is None:
            self._peft = get_peft_model(self.backbone, cfg, adapter_name=t.name).eval()
        else:
            self._peft.add_adapter(t.name, cfg)
        with torch.no_grad():
            for (i, path), (A, B) in t.weights.items():
                mod = self.layers[i].get_submodule(path)
                mod.lora_A[t.name].weight.copy_(A)
                mod.lora_B[t.name].weight.copy_(B)

    def weight_bytes(self, tenants: Iterable[str] | None = None) -> int:
        """Resident weights: backbone (with any peft LoRA inside) plus those of `tenants` (default: all)."""
        names = set(self.tenants) if tenants is None else set(tenants) & set(self.tenants)
        params = sum(p.numel() * p.element_size() for p in self.backbone.parameters())
        banks = sum(self.banks[k].stack.nbytes() for k in {self._bank_of[n] for n in names if n in self._bank_of})
        own = sum(t.numel() * t.element_size() for n in names if isinstance(self.tenants[n], SoftPromptTenant)
                  for t in self.tenants[n].model.trainable_state_dict().values())
        return params + banks + own

    # ---- requests -------------------------------------------------------------
    def _check(self, r: Request) -> tuple[Tenant | None, torch.Tensor | None, str | None]:
        """(tenant, soft prompt, error) of one request; never raises."""
        tenant = None
        if r.tenant is not None:
            if r.tenant not in self.tenants:
                why = self.refused.get(r.tenant)
                return None, None, (f"tenant '{r.tenant}' was refused: {why}" if why else
                                    f"unknown tenant '{r.tenant}'; loaded: {sorted(self.tenants)}")
            tenant = self.tenants[r.tenant]
        ids = torch.as_tensor(r.input_ids)
        vocab = self.backbone.get_input_embeddings().num_embeddings
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            return None, None, f"input_ids must be a non-empty 1-d list of token ids, got shape {tuple(ids.shape)}"
        if ids.min() < 0 or ids.max() >= vocab:
            return None, None, f"token ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]"
        soft = r.soft_prompt
        if isinstance(tenant, SoftPromptTenant):
            try:
                soft = tenant.make_prompt(ids.to(self.device))
            except Exception as e:                            # a tenant's own failure stays its own
                return None, None, f"tenant '{r.tenant}' failed to make its soft prompt: {e}"
        if soft is not None:
            d = self.backbone.config.hidden_size
            if soft.dim() != 2 or soft.shape[1] != d or not torch.isfinite(soft).all():
                return None, None, f"soft_prompt must be a finite (m, {d}) tensor, got {tuple(soft.shape)}"
        return tenant, soft, None

    def _trim(self, tokens: list[int]) -> list[int]:
        for k, t in enumerate(tokens):
            if t in self.eos:
                return tokens[: k + 1]
        return tokens

    @torch.no_grad()
    def generate(self, requests: list[Request], max_new_tokens: int = 32, num_beams: int = 1,
                 min_new_tokens: int | None = None, return_scores: bool = False) -> list[Result]:
        """Greedy (num_beams=1) or beam search over a batch that mixes tenants; one Result per request.

        `return_scores` also fills `Result.score`: the sum of the chosen tokens' log-probabilities
        (greedy) or the beam's length-normalised score (beam search).
        """
        checked = [self._check(r) for r in requests]
        results = [Result(r.tenant, None, err) for r, (_, _, err) in zip(requests, checked)]
        valid = [k for k, (_, _, err) in enumerate(checked) if err is None]
        if not valid:
            return results
        rows = [(torch.as_tensor(requests[k].input_ids), *checked[k][:2]) for k in valid]
        inputs = self._batch_inputs(rows)
        T = inputs["attention_mask"].shape[1]
        tenants = [t for _, t, _ in rows]
        kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                      do_sample=False, num_return_sequences=1, pad_token_id=self.pad,
                      return_dict_in_generate=return_scores, output_scores=return_scores)
        model, routing = self._model_for(tenants)
        kwargs.update(routing)
        with _CallHooks(self, tenants, inputs["attention_mask"], num_beams):
            out = model.generate(**inputs, **kwargs)
        seqs = out.sequences if return_scores else out
        new = seqs if "inputs_embeds" in inputs else seqs[:, T:]                  # (B, n)
        for k, seq in zip(valid, new.tolist()):
            results[k].tokens = self._trim(seq)
        if return_scores:
            if num_beams > 1:
                scores = out.sequences_scores.tolist()
            else:
                logp = torch.stack(out.scores, 1).float().log_softmax(-1)          # (B, n, V)
                chosen = logp.gather(-1, new[..., None])[..., 0]                   # (B, n)
                scores = [chosen[b, : len(results[k].tokens)].sum().item() for b, k in enumerate(valid)]
            for k, score in zip(valid, scores):
                results[k].score = score
        return results

    @torch.no_grad()
    def logits(self, requests: list[Request]) -> list[torch.Tensor]:
        """Teacher-forced logits (T_i, V) of each prompt under its tenant; raises TenantError on a bad request."""
        checked = [self._check(r) for r in requests]
        bad = [f"request {k}: {err}" for k, (_, _, err) in enumerate(checked) if err is not None]
        if bad:
            raise TenantError("; ".join(bad))
        rows = [(torch.as_tensor(r.input_ids), t, soft) for r, (t, soft, _) in zip(requests, checked)]
        inputs = self._batch_inputs(rows)
        model, kwargs = self._model_for([t for _, t, _ in rows])
        with _CallHooks(self, [t for _, t, _ in rows], inputs["attention_mask"], 1):
            out = model(**inputs, **kwargs).logits                               # (B, T, V)
        return [out[b, out.shape[1] - len(ids):] for b, (ids, _, _) in enumerate(rows)]   # prompt tokens only

    def _model_for(self, tenants: list[Tenant | None]) -> tuple[nn.Module, dict]:
        """The module to call and its routing kwargs: peft's wrapper with adapter names when LoRA is served by peft."""
        if self._peft is not None and self._peft.peft_config:
            return self._peft, {"adapter_names": [t.name if t is not None and t.kind == "lora" else "__base__"
                                                  for t in tenants]}
        return self.backbone, {}

    def _batch_inputs(self, rows) -> dict[str, torch.Tensor]:
        """Left-padded input_ids + attention_mask, or inputs_embeds when any row has a soft prompt."""
        embed = self.backbone.get_input_embeddings()
        if all(soft is None for _, _, soft in rows):
            T = max(len(ids) for ids, _, _ in rows)
            ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
            mask = torch.zeros(len(rows), T, dtype=torch.long)
            for b, (x, _, _) in enumerate(rows):
                ids[b, T - len(x):], mask[b, T - len(x):] = x, 1
            return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        parts = [embed(x.to(self.device)) if soft is None else
                 torch.cat([soft.to(self.device, self.dtype), embed(x.to(self.device))]) for x, _, soft in rows]
        T = max(len(p) for p in parts)
        embeds = embed.weight.new_zeros(len(rows), T, embed.weight.shape[1])     # (B, T, d)
        mask = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
        for b, p in enumerate(parts):
            embeds[b, T - len(p):], mask[b, T - len(p):] = p, 1
        return {"inputs_embeds": embeds, "attention_mask": mask}


def _scaled_forward(base, s: torch.Tensor, side: str, beams: int):
    """A module's forward (`base`) with its output (side "out") or input (side "in") scaled by s (P, 1, W).

    Installed as the module's forward for one call (cheaper than a forward hook: a decode
    step runs 3 of these per layer). Rows are prompt-major after HF's beam expansion
    (prompt p owns rows p*beams ...), so beams fold into the token axis. The output of a
    linear is fresh and is scaled in place; an input may be shared (q, k, v), so out of place.
    """
    if side == "out":
        def forward(*args, **kwargs):
            out = base(*args, **kwargs)            # (P*beams, T, W)
            (out if beams == 1 else out.view(s.shape[0], -1, out.shape[-1])).mul_(s)
            return out
    else:
        def forward(x, *args, **kwargs):
            return base((x.reshape(s.shape[0], -1, x.shape[-1]) * s).view_as(x), *args, **kwargs)
    return forward


class _CallHooks:
    """The hooks of one generate call: installed on enter, all removed on exit.

    Everything is per *prompt* (P rows), not per beam row: beams share their prompt's
    scales, vectors are generated once per prompt, LoRA weights are gathered once per prompt.
    """

    def __init__(self, engine: MultiTenantEngine, tenants: list[Tenant | None], mask: torch.Tensor, beams: int):
        self.e, self.beams, self.prefill_handles, self.patched = engine, beams, [], []
        self.prompts = len(tenants)
        self.pool_mask = mask.bool()                                          # (P, T)
        self.scales: dict[tuple, torch.Tensor] = {}                           # site -> (P, 1, width)
        self.vector_groups = []                                                # (bank, prompts or None, slots)
        self.lora: list[dict] = []
        dev = engine.device
        for key, bank in engine.banks.items():
            idx = [b for b, t in enumerate(tenants) if t is not None and engine._bank_of.get(t.name) == key]
            if not idx:
                continue
            prompts = torch.tensor(idx, device=dev)
            slots = torch.tensor([bank.stack.slot_of[tenants[b].name] for b in idx], device=dev)
            if key[0] == "vector":
                self.vector_groups.append((bank, None if len(idx) == len(tenants) else prompts, slots))
                for i in range(len(engine.layers)):
                    for role in bank.roles:
                        self._scale((i, engine.sites[role].path, engine.sites[role].side))
            elif key[0] == "static":
                for site, s in bank.gather(slots).items():                    # (b, width)
                    self._scale(site)[prompts, 0] = s.to(engine.dtype)
            else:                                                             # gathered LoRA
                per_prompt = torch.zeros(len(tenants), dtype=torch.long, device=dev)
                per_prompt[prompts] = slots
                self.lora.append(bank.gather(per_prompt))

    def _scale(self, site: tuple) -> torch.Tensor:
        if site not in self.scales:
            width = self.e.widths[(site[1], site[2])]
            self.scales[site] = torch.ones(self.prompts, 1, width, dtype=self.e.dtype, device=self.e.device)
        return self.scales[site]

    def __enter__(self):
        layers = self.e.layers
        for (i, path, side), s in self.scales.items():
            self._patch(layers[i].get_submodule(path), lambda base: _scaled_forward(base, s, side, self.beams))
        for gathered in self.lora:
            for (i, path), (A, B) in gathered.items():
                self._patch(layers[i].get_submodule(path), lambda base: lora_forward(base, A, B))
        if self.vector_groups:
            for i, layer in enumerate(layers):
                self.prefill_handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            self.prefill_handles.append(self.e.backbone.register_forward_hook(self._end_prefill))
        return self

    def _patch(self, module: nn.Module, wrap) -> None:
        """module.forward = wrap(current forward) for this call; what it had before (the class's
        forward, or an instance patch such as accelerate's) comes back on exit."""
        self.patched.append((module, module.__dict__.get("forward")))
        module.forward = wrap(module.forward)

    def __exit__(self, *exc):
        for h in self.prefill_handles:
            h.remove()
        for mod, own in reversed(self.patched):        # restore what each module had before the call
            if own is None:
                del mod.forward
            else:
                mod.forward = own
        return False

    def _end_prefill(self, module, args, out):
        """After the first forward (the prefill) no generator runs again: drop the layer hooks."""
        for h in self.prefill_handles:
            h.remove()

    def _layer_hook(self, i: int):
        sites = self.e.sites

        def hook(layer, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]                  # (P*beams, T, d)
            if h.shape[0] != self.prompts * self.beams or h.shape[1] != self.pool_mask.shape[1]:
                raise RuntimeError(f"vector generators ran on {tuple(h.shape[:2])}, not the prefill "
                                   f"({self.prompts} x {self.beams} beams, {self.pool_mask.shape[1]} tokens)")
            h = h[:: self.beams]                                              # (P, T, d): one row per prompt
            for bank, prompts, slots in self.vector_groups:
                hb, mask = (h, self.pool_mask) if prompts is None else (h[prompts], self.pool_mask[prompts])
                r = torch.arange(self.prompts, device=h.device) if prompts is None else prompts
                for role, v in bank.vectors(i, hb, mask, slots).items():      # (b, width)
                    site = sites[role]
                    s = self.scales[(i, site.path, site.side)][:, 0]           # (P, width) view
                    cols = torch.arange(s.shape[1], device=s.device) if site.index is None else site.index.to(s.device)
                    s[r[:, None], cols[None, :]] = v.to(s.dtype)
        return hook
