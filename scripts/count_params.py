"""Tunable parameters of every method on LLaMA-2 7B and SmolLM2-135M, built on the meta device (no weights).

    python scripts/count_params.py [method ...]
"""
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from papeft.backbones import _load_gguf_cached

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama2_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}


def smollm2_config():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs/backbone/smollm2_135m.yaml"), resolve=True)
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(_load_gguf_cached(cfg))


def count(method_yaml: Path, hf_config) -> dict:
    from papeft.tuners import build_method
    m = OmegaConf.to_container(OmegaConf.load(method_yaml), resolve=True)
    with torch.device("meta"):
        return build_method(AutoModelForCausalLM.from_config(hf_config), m).param_counts()


def main(names: list[str]) -> None:
    shapes = {**SHAPES, "smollm2_135m": smollm2_config()}
    yamls = sorted((REPO / "configs/method").glob("*.yaml"))
    print("| method | " + " | ".join(f"{b} (no bias / with bias)" for b in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for y in yamls:
        if names and y.stem not in names:
            continue
        cells = []
        for cfg in shapes.values():
            c = count(y, cfg)
            cells.append(f"{c['params_trainable_no_bias']:,} / {c['params_trainable']:,}")
        print(f"| {y.stem} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
