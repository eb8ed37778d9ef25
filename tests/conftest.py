import os
from pathlib import Path

import pytest
import torch

from papeft.backbones import build_random

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")   # tests never log to wandb unless a test asks for it
TINY = {
    "llama": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "gemma": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=12, max_position_embeddings=256),
    "gpt2": dict(n_embd=48, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256),
}
VOCAB = 97


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return build_random(arch, TINY[arch], vocab_size=VOCAB, seed=seed).eval()


def data_root() -> Path:
    return Path(os.environ.get("PAPEFT_DATA") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"data root {root} not found (set PAPEFT_DATA)")
    return root
