"""One frozen backbone, many tenants, mixed in one batch: `MultiTenantEngine`.

    engine = MultiTenantEngine(backbone)                 # lora_backend="gathered" | "peft"
    engine.add_tenant("acme", "runs/.../adapter")        # any method with a serving form
    results = engine.generate([Request(ids, "acme"), Request(ids2, "zeta"), Request(ids3)], num_beams=3)

A row is served by its tenant's *serving form* (methods/serving_form.py), which the method
declares; the engine knows the forms, never the methods. Each form has a bank (banks.py,
gathered_lora.py) stacking its tenants' weights; hooks and patched forwards are installed
for the call only and removed after:
* prompt vectors (PARADE / PARA / PEDRO): at prefill a pre-hook on each decoder
  layer runs the generators of all rows at once with their own gathered weights
  (banks.VectorBank: the generator's own maths, `generator_vectors`, one tenant per row) and
  writes the rows' vectors into per-module scale tensors (P, 1, width), one row per prompt.
  The layer pre-hooks are removed once the prefill forward returns: a decode step runs only
  `out *= scale` per scaled module (its forward patched for the call, restored after).
  Beam search expands each prompt into adjacent rows before prefill; the generators run
  once per prompt and its beams share its scales (folded into the token axis,
  role_scaling.scale_rows), so every beam carries its prompt's vectors.
* static scales ((IA)3, ours and peft's): gathered into the same scale tensors when the call starts.
* low-rank deltas (LoRA), `lora_backend="gathered"`: gathered_lora (BGMV-style, one gather per
  call); `lora_backend="peft"`: tenants are named adapters of a peft wrapper and rows
  are routed with peft's mixed batch (`generate(adapter_names=[...])`).
* soft prompts (LoPA): a tenant's encoder makes each of its requests' (m, d) soft prompt
  when the call starts (or a request brings its own `soft_prompt`); it is prepended to
  that row's input embeddings (the whole batch then goes through `inputs_embeds`).
Rows of other forms see a scale of exactly 1 and a LoRA delta of exactly 0, and
tenants of one layout share a bank, so a batch costs one pass per bank, not per tenant.

Requests that arrive over time: continuous.py (iteration-level batching) prefills newcomers
through this engine's call hooks and keeps each row's vectors, scales and LoRA weights in a
running batch that rows join and leave between decode steps.

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

from papeft.backbone.architectures import ROLE_PATHS, decoder_layers, full_width, model_type, module_width
from papeft.methods.serving_form import LowRankDeltas, PromptVectors, ServingForm, SoftPrompts, StaticScales
from papeft.serving.banks import Bank, SoftPromptBank, StaticBank, VectorBank
from papeft.serving.forwards import PatchedForwards, scaled_forward
from papeft.serving.gathered_lora import LoraBank, lora_forward
from papeft.serving.tenants import Tenant, TenantError, load_tenant


@dataclass
class Request:
    input_ids: list[int] | torch.Tensor        # the prompt's token ids (chat template applied)
    tenant: str | None = None                  # None: the bare backbone
    soft_prompt: torch.Tensor | None = None    # (m, d) prefix embeddings travelling with the request (LoPA)


class RequestError(str):
    """An error of `MultiTenantEngine.check`, with the status a server answers it with: 404 (the tenant is
    unknown or was refused), 400 (the request's own input), 500 (the tenant failed on a valid request)."""

    def __new__(cls, message: str, status: int = 400):
        error = super().__new__(cls, message)
        error.status = status
        return error


@dataclass
class Result:
    tenant: str | None
    tokens: list[int] | None                   # new tokens, cut after the first end token
    error: str | None = None
    score: float | None = None                 # with generate(return_scores=True)

    @property
    def ok(self) -> bool:
        return self.error is None


# one bank class per serving form (never per method): a new method with one of these forms needs no change here
BANKS: dict[type[ServingForm], type[Bank]] = {PromptVectors: VectorBank, StaticScales: StaticBank,
                                               LowRankDeltas: LoraBank, SoftPrompts: SoftPromptBank}


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
        self.widths = {(path, side): module_width(self.layers[0].get_submodule(path), side)
                       for path in set(ROLE_PATHS[model_type(backbone)].values()) for side in ("out", "in")}
        self.tenants: dict[str, Tenant] = {}
        self.refused: dict[str, str] = {}        # tenant name -> why its adapter was refused
        self.banks: dict[tuple, Bank] = {}       # (bank class, signature) -> bank
        self._bank_of: dict[str, tuple] = {}
        self._peft = None                        # peft wrapper (lora_backend="peft")
        self._in_peft: set[str] = set()          # tenants served as peft adapters
        gen = backbone.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else backbone.config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        pad = gen.pad_token_id if gen.pad_token_id is not None else min(self.eos, default=0)
        self.pad = pad if 0 <= pad < backbone.get_input_embeddings().num_embeddings else 0   # masked anyway

    # ---- registry -------------------------------------------------------------
    def add_tenant(self, name: str, directory: str | Path, loaded: Tenant | None = None) -> Tenant:
        """Load a tenant next to the loaded ones; raises TenantError (and remembers it) if refused.
        `loaded`: the tenant already read by `load_tenant` (which touches no engine state, so a server
        reads the adapter while its batch runs and only places and probes it between iterations)."""
        if name in self.tenants:
            raise TenantError(f"tenant '{name}' is already loaded; remove it first")
        try:
            tenant = loaded or load_tenant(name, directory, self.backbone, self.tokenizer)
            try:
                self._place(name, tenant.form)
            except TenantError:
                raise
            except Exception as e:  # noqa: BLE001  (a tenant that does not fit is refused; the others stay)
                raise TenantError(f"{directory}: cannot place tenant '{name}': {type(e).__name__}: {e}") from e
            tenant.form = None                   # its weights now live in a bank (or peft): keep a record
            self.tenants[name] = tenant
            self._probe(name, directory)
        except TenantError as e:
            self.refused[name] = str(e)
            raise
        self.refused.pop(name, None)
        return tenant

    def _place(self, name: str, form: ServingForm) -> None:
        """Put a tenant's weights where batches read them: peft, or the bank of its form and layout."""
        if isinstance(form, LowRankDeltas) and self.lora_backend == "peft":
            self._peft_add(name, form)
            self._in_peft.add(name)
            return
        if type(form) not in BANKS:
            raise ValueError(f"no bank serves the form {type(form).__name__}")
        cls = BANKS[type(form)]
        key = (cls, cls.signature(form))
        if key not in self.banks:
            self.banks[key] = cls(form)
        self.banks[key].add(name, form)
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
        del self.tenants[name]
        key = self._bank_of.pop(name, None)
        if key is not None:
            bank = self.banks[key]
            bank.remove(name)
            if not len(bank):
                del self.banks[key]
        elif name in self._in_peft:
            self._in_peft.remove(name)
            self._peft.delete_adapter(name)

    def _peft_add(self, name: str, form: LowRankDeltas) -> None:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=form.rank, lora_alpha=form.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                         target_modules=sorted({path for _, path in form.weights}))
        if self._peft is None:
            self._peft = get_peft_model(self.backbone, cfg, adapter_name=name).eval()
        else:
            self._peft.add_adapter(name, cfg)
        with torch.no_grad():
            for (i, path), (A, B) in form.weights.items():
                mod = self.layers[i].get_submodule(path)
                mod.lora_A[name].weight.copy_(A)
                mod.lora_B[name].weight.copy_(B)

    def weight_bytes(self, tenants: Iterable[str] | None = None) -> int:
        """Resident weights: backbone (with any peft LoRA inside) plus those of `tenants` (default: all)."""
        names = set(self.tenants) if tenants is None else set(tenants) & set(self.tenants)
        params = sum(p.numel() * p.element_size() for p in self.backbone.parameters())
        return params + sum(self.banks[k].nbytes() for k in {self._bank_of[n] for n in names if n in self._bank_of})

    # ---- requests -------------------------------------------------------------
    def check(self, r: Request) -> tuple[Tenant | None, torch.Tensor | None, RequestError | None]:
        """(tenant, soft prompt, error) of one request; never raises."""
        tenant = None
        if r.tenant is not None:
            if r.tenant not in self.tenants:
                why = self.refused.get(r.tenant)
                return None, None, RequestError(f"tenant '{r.tenant}' was refused: {why}" if why else
                                                f"unknown tenant '{r.tenant}'; loaded: {sorted(self.tenants)}", 404)
            tenant = self.tenants[r.tenant]
        try:
            ids = torch.as_tensor(r.input_ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            return None, None, RequestError(f"input_ids must be token ids: {type(e).__name__}: {e}")
        vocab = self.backbone.get_input_embeddings().num_embeddings
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            return None, None, RequestError(f"input_ids must be a non-empty 1-d list of token ids, "
                                            f"got shape {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= vocab:
            return None, None, RequestError(f"token ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
        soft = r.soft_prompt
        if r.tenant in self._bank_of:                         # a soft-prompt tenant makes the request's own
            try:
                made = self.banks[self._bank_of[r.tenant]].prompt_for(r.tenant, ids.to(self.device))
            except Exception as e:                            # a tenant's own failure stays its own
                return None, None, RequestError(f"tenant '{r.tenant}' failed to make its soft prompt: {e}", 500)
            soft = soft if made is None else made
        if soft is not None:
            d = self.backbone.config.hidden_size
            if soft.dim() != 2 or soft.shape[1] != d or not torch.isfinite(soft).all():
                return None, None, RequestError(f"soft_prompt must be a finite (m, {d}) tensor, "
                                                f"got {tuple(soft.shape)}")
        return tenant, soft, None

    def trim(self, tokens: list[int]) -> list[int]:
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
        checked = [self.check(r) for r in requests]
        results = [Result(r.tenant, None, err) for r, (_, _, err) in zip(requests, checked)]
        valid = [k for k, (_, _, err) in enumerate(checked) if err is None]
        if not valid:
            return results
        rows = [(torch.as_tensor(requests[k].input_ids), *checked[k][:2]) for k in valid]
        inputs = self.batch_inputs(rows)
        T = inputs["attention_mask"].shape[1]
        tenants = [t for _, t, _ in rows]
        kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                      do_sample=False, num_return_sequences=1, pad_token_id=self.pad,
                      return_dict_in_generate=return_scores, output_scores=return_scores)
        model, routing = self.model_for(tenants)
        kwargs.update(routing)
        with CallHooks(self, tenants, inputs["attention_mask"], num_beams):
            out = model.generate(**inputs, **kwargs)
        seqs = out.sequences if return_scores else out
        new = seqs if "inputs_embeds" in inputs else seqs[:, T:]                  # (B, n)
        for k, seq in zip(valid, new.tolist()):
            results[k].tokens = self.trim(seq)
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
        checked = [self.check(r) for r in requests]
        bad = [f"request {k}: {err}" for k, (_, _, err) in enumerate(checked) if err is not None]
        if bad:
            raise TenantError("; ".join(bad))
        rows = [(torch.as_tensor(r.input_ids), t, soft) for r, (t, soft, _) in zip(requests, checked)]
        inputs = self.batch_inputs(rows)
        model, kwargs = self.model_for([t for _, t, _ in rows])
        with CallHooks(self, [t for _, t, _ in rows], inputs["attention_mask"], 1):
            out = model(**inputs, **kwargs).logits                               # (B, T, V)
        return [out[b, out.shape[1] - len(ids):] for b, (ids, _, _) in enumerate(rows)]   # prompt tokens only

    def model_for(self, tenants: list[Tenant | None]) -> tuple[nn.Module, dict]:
        """The module to call and its routing kwargs: peft's wrapper with adapter names when LoRA is served by peft."""
        return self.route(self.peft_names(tenants))

    def peft_names(self, tenants: list[Tenant | None]) -> list[str]:
        """Each row's peft adapter name; "__base__" (peft's "no adapter") for rows not served by peft."""
        return [t.name if t is not None and t.name in self._in_peft else "__base__" for t in tenants]

    def route(self, names: list[str]) -> tuple[nn.Module, dict]:
        """peft's wrapper with the rows' adapter names while peft serves LoRA tenants, else the backbone."""
        if self._peft is not None and self._peft.peft_config:
            return self._peft, {"adapter_names": names}
        return self.backbone, {}

    def batch_inputs(self, rows) -> dict[str, torch.Tensor]:
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


class CallHooks:
    """The hooks of one generate call: installed on enter, all removed on exit.

    Every bank with rows in the call joins it (`Bank.join`): static scales are written now,
    vector banks are listed for the prefill, LoRA weights are gathered. Everything is per
    *prompt* (P rows), not per beam row: beams share their prompt's scales, vectors are
    generated once per prompt, LoRA weights are gathered once per prompt.
    """

    def __init__(self, engine: MultiTenantEngine, tenants: list[Tenant | None], mask: torch.Tensor, beams: int):
        self.e, self.beams, self.prefill_handles, self.patched = engine, beams, [], PatchedForwards()
        self.prompts, self.dtype = len(tenants), engine.dtype
        self.pool_mask = mask.bool()                                          # (P, T)
        self.scales: dict[tuple, torch.Tensor] = {}                           # site -> (P, 1, width)
        self.vector_banks = []                                                # (bank, prompts or None, slots)
        self.lora: dict[Bank, dict] = {}                                      # LoRA bank -> its gathered weights
        dev = engine.device
        for key, bank in engine.banks.items():
            idx = [b for b, t in enumerate(tenants) if t is not None and engine._bank_of.get(t.name) == key]
            if idx:
                slots = torch.tensor([bank.slot(tenants[b].name) for b in idx], device=dev)
                bank.join(self, torch.tensor(idx, device=dev), slots)

    def scale(self, site: tuple) -> torch.Tensor:
        """The call's scale (P, 1, width) at site (layer, path, side), all ones until a bank writes it."""
        if site not in self.scales:
            width = self.e.widths[(site[1], site[2])]
            self.scales[site] = torch.ones(self.prompts, 1, width, dtype=self.dtype, device=self.e.device)
        return self.scales[site]

    def __enter__(self):
        layers = self.e.layers
        for (i, path, side), s in self.scales.items():
            self.patched.patch(layers[i].get_submodule(path), lambda base: scaled_forward(base, s, side))
        for gathered in self.lora.values():
            for (i, path), (A, B) in gathered.items():
                self.patched.patch(layers[i].get_submodule(path), lambda base: lora_forward(base, A, B))
        if self.vector_banks:
            for i, layer in enumerate(layers):
                self.prefill_handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            self.prefill_handles.append(self.e.backbone.register_forward_hook(self._end_prefill))
        return self

    def __exit__(self, *exc):
        for h in self.prefill_handles:
            h.remove()
        self.patched.restore()
        return False

    def _end_prefill(self, module, args, out):
        """After the first forward (the prefill) no generator runs again: drop the layer hooks."""
        for h in self.prefill_handles:
            h.remove()

    def _layer_hook(self, i: int):
        def hook(layer, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]                  # (P*beams, T, d)
            if h.shape[0] != self.prompts * self.beams or h.shape[1] != self.pool_mask.shape[1]:
                raise RuntimeError(f"vector generators ran on {tuple(h.shape[:2])}, not the prefill "
                                   f"({self.prompts} x {self.beams} beams, {self.pool_mask.shape[1]} tokens)")
            h = h[:: self.beams]                                              # (P, T, d): one row per prompt
            for bank, prompts, slots in self.vector_banks:
                hb, mask = (h, self.pool_mask) if prompts is None else (h[prompts], self.pool_mask[prompts])
                rows = torch.arange(self.prompts, device=h.device) if prompts is None else prompts
                vectors = bank.vectors(i, hb, mask, slots)                    # role -> (b, width)
                for (path, side), sites in bank.module_sites.items():
                    s = self.scales[(i, path, side)][:, 0]                    # (P, width) view
                    s[rows] = full_width(sites, vectors, s.shape[1], 1.0).to(s.dtype)
        return hook
