"""Banks: the weights of many tenants of one serving form and one layout, stacked so a batch gathers
each row's own with one indexing op per tensor.

Every bank answers the same calls, so the engine never asks which form a tenant has:
`signature(form)` (tenants with equal signatures share a bank), `add` / `remove` / `slot`,
`tensors()` (what stays resident), `prompt_for(name, ids)` (a request's soft prompt, if its
tenant makes one) and `join(call, prompts, slots)`: what the bank does for its rows of one
engine call (`engine.CallHooks`: scales to write, generators to run at prefill, LoRA weights
to add). Gathered LoRA's bank is in gathered_lora.py.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from papeft.backbone.architectures import sites_by_module
from papeft.methods.serving_form import PromptVectors, ServingForm, SiteKey, SoftPrompts, StaticScales
from papeft.methods.vector_generator import generator_vectors
from papeft.serving.tenants import TenantError


class SlotStack:
    """Same-shaped tensors of many tenants stacked on dim 0, one slot per tenant.

    With `zero_slot`, slot 0 is never given out and stays zero: the "no adapter"
    row (gathered LoRA). Adding writes one slot; when none is free the stack
    grows by exactly one (a copy of the stack: adding is rare, memory stays
    exact). Removing zeroes and frees a slot for the next add, so other
    tenants' slots never move.
    """

    def __init__(self, zero_slot: bool = False):
        self.tensors: dict[str, torch.Tensor] = {}     # key -> (capacity, *shape)
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._first = int(zero_slot)

    def __len__(self) -> int:
        return len(self.slot_of)

    def add(self, name: str, weights: dict[str, torch.Tensor]) -> int:
        if self.tensors and (set(weights) != set(self.tensors) or any(
                w.shape != self.tensors[k].shape[1:] for k, w in weights.items())):
            raise TenantError(f"tenant '{name}': weights do not match the stack's layout")
        if not self.tensors:
            self.tensors = {k: w.new_zeros((self._first, *w.shape)) for k, w in weights.items()}
        if self._free:
            slot = self._free.pop()
        else:
            slot = next(iter(self.tensors.values())).shape[0]
            self.tensors = {k: torch.cat([t, t.new_zeros((1, *t.shape[1:]))]) for k, t in self.tensors.items()}
        for k, w in weights.items():
            self.tensors[k][slot] = w
        self.slot_of[name] = slot
        return slot

    def remove(self, name: str) -> None:
        slot = self.slot_of.pop(name)
        for t in self.tensors.values():
            t[slot].zero_()
        self._free.append(slot)

    def gather(self, key: str, slots: torch.Tensor) -> torch.Tensor:
        return self.tensors[key].index_select(0, slots)     # (B, *shape), one indexing op

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Bank:
    """What every bank answers; a stacked bank defines `signature`, `stacked` and `join`."""

    zero_slot = False

    def __init__(self, form: ServingForm):
        self.stack = SlotStack(self.zero_slot)

    @staticmethod
    def signature(form: ServingForm) -> tuple:
        raise NotImplementedError

    def stacked(self, form: ServingForm) -> dict[str, torch.Tensor]:
        """A tenant's weights as the stack holds them, one same-shaped tensor per key."""
        raise NotImplementedError

    def join(self, call, prompts: torch.Tensor, slots: torch.Tensor) -> None:
        """Take part in one engine call for the rows `prompts` (b,) whose tenants sit in `slots` (b,)."""
        raise NotImplementedError

    def add(self, name: str, form: ServingForm) -> None:
        self.stack.add(name, self.stacked(form))

    def remove(self, name: str) -> None:
        self.stack.remove(name)

    def slot(self, name: str) -> int:
        return self.stack.slot_of[name]

    def __len__(self) -> int:
        return len(self.stack)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.stack.tensors.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def prompt_for(self, name: str, ids: torch.Tensor) -> torch.Tensor | None:
        return None


def module_signature(m: nn.Module) -> tuple:
    """What makes two modules interchangeable under `functional_call`: class, parameter shapes, settings."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())
    settings = tuple(sorted((k, v) for k, v in vars(m).items()
                            if not k.startswith("_") and isinstance(v, (int, float, str, bool))))
    return type(m).__qualname__, params, settings, m.extra_repr()


class VectorBank(Bank):
    """Vector generators of tenants with one structure (`PromptVectors`), stacked so every row gathers its own.

    Per layer i: W_down, W_up, b_up, plus the pooler's and the activation's parameters (capsule
    weights, PEDRO's rational coefficients), in `VectorGenerator.row_weights`'s layout; at
    prefill `generator_vectors` runs them, the generator's own maths with one tenant per row.
    """

    def __init__(self, form: PromptVectors):
        super().__init__(form)
        self.template = copy.deepcopy(form.generators)    # structure for functional_call; its weights are unused,
        if not list(self.template.buffers()):               # so they go to the meta device (buffers would be read)
            self.template.to("meta")
        self.module_sites = sites_by_module(form.sites)     # (module path, side) -> the roles acting there

    @staticmethod
    def signature(form: PromptVectors) -> tuple:
        g = form.generators[0]
        return (len(form.generators), tuple(g.roles), tuple(g.widths), tuple(g.down.weight.shape),
                module_signature(g.pooler), module_signature(g.act), g.down.weight.dtype)

    def stacked(self, form: PromptVectors) -> dict[str, torch.Tensor]:
        return {f"{i}.{n}": w for i, g in enumerate(form.generators) for n, w in g.row_weights().items()}

    def join(self, call, prompts, slots) -> None:
        """Its generators run at the call's prefill (`call.prefill_vectors`) into scales that start at 1."""
        call.vector_banks.append((self, None if len(prompts) == call.prompts else prompts, slots))
        for i in range(len(self.template)):
            for path, side in self.module_sites:
                call.scale((i, path, side))

    def vectors(self, i: int, h: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer i's vectors for rows `h` (b, T, d) with prompt `mask` (b, T): role -> (b, width)."""
        prefix = f"{i}."
        rows = {k[len(prefix):]: self.stack.gather(k, slots) for k in self.stack.tensors if k.startswith(prefix)}
        return generator_vectors(self.template[i], h, mask, rows)


class StaticBank(Bank):
    """Static-scale tenants (`StaticScales`) with one layout: {(layer, path, side): (width,)} stacked per site."""

    def __init__(self, form: StaticScales):
        super().__init__(form)
        self.sites = self.signature(form)

    @staticmethod
    def signature(form: StaticScales) -> tuple[SiteKey, ...]:
        return tuple(sorted(form.scales))

    def stacked(self, form: StaticScales) -> dict[str, torch.Tensor]:
        return {"|".join(map(str, k)): v for k, v in form.scales.items()}

    def join(self, call, prompts, slots) -> None:
        """Its rows' scales, written once when the call starts."""
        for site in self.sites:
            call.scale(site)[prompts, 0] = self.stack.gather("|".join(map(str, site)), slots).to(call.dtype)


class SoftPromptBank(Bank):
    """One soft-prompt tenant (`SoftPrompts`): its own encoder, nothing to stack; it makes each of its
    requests' (m, d) prompt before the batch runs, and the prompt then travels in the batch's embeddings."""

    def __init__(self, form: SoftPrompts):
        self.form, self.name = form, None

    @staticmethod
    def signature(form: SoftPrompts) -> tuple:
        return (id(form),)                                  # never shared

    def add(self, name: str, form: SoftPrompts) -> None:
        self.name = name

    def remove(self, name: str) -> None:
        self.name = None

    def slot(self, name: str) -> int:
        return 0

    def __len__(self) -> int:
        return int(self.name is not None)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.form.weights.values())

    def join(self, call, prompts, slots) -> None:
        pass

    def prompt_for(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self.form.make(ids)
