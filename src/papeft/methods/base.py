"""What every method returns: an `AdaptedModel` around a frozen backbone, plus the method registry.

A method is one module that registers `(name, config dataclass, apply function)`
and one YAML under configs/method/. `build_method` turns that YAML into the
dataclass (unknown keys, wrong types and values outside the class's `CHECKS`
are errors naming the key; `method_config` does only that) and applies it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from papeft.config_checks import make_config  # noqa: F401  (re-exported: the runner and tests use it from here)
from papeft.io import atomic_path, write_json
from papeft.methods.serving_form import ServingForm

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def backbone_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Enough of the backbone's shape to refuse an adapter saved for another backbone."""
    c = model.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "vocab_size": c.vocab_size}


class AdaptedModel(nn.Module):
    """A frozen backbone plus a method's trainable weights, with one call signature for the trainer."""

    def __init__(self, model: nn.Module, method: str, config: Any):
        super().__init__()
        self.model = model
        self.method = method
        self.config = config
        self.logit_positions: torch.Tensor | None = None    # set inside `logits_only_at`

    @property
    def backbone(self) -> nn.Module:
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @contextlib.contextmanager
    def logits_only_at(self, positions: torch.Tensor):
        """Inside this block a forward runs the LM head only where `positions` (B, T) of the input is
        True and returns logits (N, V), one row per True position in row-major order.

        One mechanism for every method: a pre-hook on the backbone's output embedding picks the N
        hidden states out of (B, T', d). Virtual positions a method puts *before* the input (the
        soft prompts of prompt tuning, P-tuning and LoPA; T' = m + T) are never picked: the mask is
        aligned to the end of the hidden sequence. A method that reshapes logits after the backbone
        reads `self.logit_positions` (None outside this block).
        """
        def pick(module, args):
            h = args[0]                                                       # (B, T', d)
            extra = h.shape[1] - positions.shape[1]
            if h.dim() != 3 or h.shape[0] != positions.shape[0] or extra < 0:
                raise RuntimeError(f"logits_only_at: positions {tuple(positions.shape)} do not fit the "
                                   f"LM head's input {tuple(h.shape)}")
            keep = torch.nn.functional.pad(positions, (extra, 0)).to(h.device).flatten()
            return (h.flatten(0, 1).index_select(0, keep.nonzero().squeeze(1)),)   # (N, d)

        handle = self.backbone.get_output_embeddings().register_forward_pre_hook(pick)
        self.logit_positions = positions
        try:
            yield
        finally:
            handle.remove()
            self.logit_positions = None

    def forward(self, input_ids, attention_mask=None, labels=None, prompt_mask=None, **kw):
        """`prompt_mask` (B, T) marks prompt tokens; methods that do not read the prompt ignore it."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **gen_kwargs):
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)

    # ---- hooks the shared trainer calls; a method overrides only what it needs ----
    def outer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the outer level of a bi-level optimisation (PEDRO's rational coefficients).

        When non-empty, the trainer holds out `bilevel_options()["val_fraction"]` of the
        training set as D_val and alternates one step of the other trainable weights on a
        D_train batch with one step of these on a D_val batch, each with its own optimizer.
        """
        return []

    def bilevel_options(self) -> dict[str, Any]:
        """{"val_fraction", "lr", "weight_decay"} of the outer optimizer (used only with outer parameters)."""
        return {"val_fraction": 0.1, "lr": 1e-3, "weight_decay": 0.0}

    def on_train_begin(self, total_steps: int) -> None:
        """Called once before the first step with the planned number of optimizer steps."""

    def step_regularizer(self) -> torch.Tensor | None:
        """A loss term on the weights alone (AdaLoRA's orthogonality), added once per optimizer step of
        the inner level with its own weight, independent of the micro-batch size; None: no such term."""
        return None

    def on_step_end(self, step: int) -> None:
        """Called after backward and the optimizer step, before zero_grad (AdaLoRA's rank allocation)."""

    def resume_state(self) -> dict[str, torch.Tensor]:
        """Method state beyond the weights that a resumed run needs (AdaLoRA's importance scores)."""
        return {}

    def load_resume_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `resume_state` returned."""

    # ---- hooks the runner and the server call ----
    def set_tokenizer(self, tokenizer) -> None:
        """The backbone's tokenizer, for methods that read the prompt as text (LoPA's MiniLM encoder)."""

    def learned_activations(self) -> list[nn.Module]:
        """Per-layer learned activation functions, layer 0 first (PEDRO's rational units); the runner
        plots them against GELU next to the run's results (PEDRO Figure 2). []: none."""
        return []

    def serving_form(self, backbone: nn.Module) -> ServingForm | None:
        """How a multi-tenant server applies this adapter (methods/serving_form.py); None: not servable.

        `self` may sit on a weightless (meta-device) skeleton of `backbone`, the serving backbone,
        with the adapter's weights loaded; a form that reads the backbone binds to `backbone` and
        never changes it.
        """
        return None

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"adapter weights do not match method '{self.method}': "
                             f"missing {missing[:3]}, unexpected {extra[:3]}")
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"adapter tensor '{name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
        with torch.no_grad():
            for name, tensor in state.items():
                if not params[name].is_meta:
                    params[name].copy_(tensor)
        # on a weightless skeleton (meta device, serving) the saved tensors become the parameters
        meta = {n: t for n, t in state.items() if params[n].is_meta}
        if meta:
            self.load_state_dict(meta, strict=False, assign=True)

    def param_counts(self) -> dict[str, int]:
        """Tunable parameters with and without bias vectors (the papers' tables count weights only)."""
        total = no_bias = 0
        for name, p in self.named_parameters():
            if p.requires_grad:
                total += p.numel()
                no_bias += 0 if name.endswith("bias") else p.numel()
        return {"params_trainable": total, "params_trainable_no_bias": no_bias}

    def save_adapter(self, directory: str | Path) -> Path:
        """Trainable weights as safetensors plus their config; never pickle."""
        directory = Path(directory)
        state = {n: t.detach().to("cpu").contiguous() for n, t in self.trainable_state_dict().items()}
        with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"method": self.method})
        write_json(directory / ADAPTER_CONFIG, {
            "method": self.method, "config": dataclasses.asdict(self.config),
            "backbone": backbone_fingerprint(self.backbone), **self.param_counts()})
        return directory

    def load_adapter(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta = json.loads((directory / ADAPTER_CONFIG).read_text())
        if meta["method"] != self.method:
            raise ValueError(f"{directory}: adapter is for method '{meta['method']}', not '{self.method}'")
        if meta["backbone"] != backbone_fingerprint(self.backbone):
            raise ValueError(f"{directory}: adapter was saved for backbone {meta['backbone']}, "
                             f"this backbone is {backbone_fingerprint(self.backbone)}")
        self.load_trainable_state_dict(load_file(str(directory / ADAPTER_WEIGHTS)))


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any], AdaptedModel]
    tunes_weights: bool = True          # False: nothing to train (the zero-shot floor)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, tunes_weights: bool = True):
    def deco(fn: Callable[[nn.Module, Any], AdaptedModel]):
        METHODS[name] = MethodSpec(name, config_cls, fn, tunes_weights)
        return fn
    return deco


def method_config(method_cfg: dict[str, Any]) -> tuple[MethodSpec, Any]:
    """(the registered method, its config) of a configs/method/*.yaml entry, every key checked
    (config_checks.make_config: unknown keys, types, the config class's CHECKS); loads nothing."""
    values = dict(method_cfg)
    values.pop("name", None)
    kind = values.pop("type", None)
    if not isinstance(kind, str) or kind not in METHODS:
        raise ValueError(f"method.type={kind!r} is not registered; known methods: {sorted(METHODS)}")
    spec = METHODS[kind]
    return spec, make_config(spec.config_cls, values, where="method")


def build_method(model: nn.Module, method_cfg: dict[str, Any]) -> AdaptedModel:
    """Apply a configs/method/*.yaml entry to `model` (frozen in place).

    `type` is the registry key; `name` (optional) is the run's label, e.g. `parade_4` of type `parade`.
    """
    spec, config = method_config(method_cfg)
    return spec.apply(freeze(model), config, spec.name)
