import contextlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from papeft.backbone.loading import build_random

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


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_root() -> Path:
    return Path(os.environ.get("PAPEFT_DATA") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"data root {root} not found (set PAPEFT_DATA)")
    return root


@contextlib.contextmanager
def float64():
    """Build and run in float64: tests that claim two paths are "the same computation" then differ by
    ~1e-15 (or, past transformers' float32 RMSNorm, by float32 ulps), never by a torch build's summation order."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def within_float32_ulps(a: torch.Tensor, b: torch.Tensor, ulps: int = 64) -> None:
    """a == b up to `ulps` float32 ulps of the largest |value| (float64 tensors). transformers' RMSNorm
    computes in float32 even in a float64 model, so two float64 paths that differ by one float64 ulp before
    a norm can differ by one float32 ulp after it, a few more after the next layers. A wrong weight, a term
    counted twice or a row given another tenant's weights moves values by orders of magnitude more."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    torch.testing.assert_close(a, b, rtol=0, atol=ulps * torch.finfo(torch.float32).eps * scale)


def task_config(name: str):
    """configs/task/{name}.yaml as the run composes it (its defaults list merged in), as a DictConfig."""
    from omegaconf import OmegaConf

    from papeft.paths import composed
    return OmegaConf.create(composed("task", name))


@pytest.fixture(scope="module")
def root() -> str:
    """The official data files (PAPEFT_DATA, else ../shared/data); skips the test where they are absent."""
    path = data_root()
    if not path.is_dir():
        pytest.skip(f"data root {path} not found: set PAPEFT_DATA to the shared data directory")
    return str(path)


def tuned_method_yamls() -> list[Path]:
    """configs/method/*.yaml of every method that trains weights (all but the zero-shot floor)."""
    from omegaconf import OmegaConf

    from papeft.methods import METHODS
    paths = sorted((REPO / "configs" / "method").glob("*.yaml"))
    return [p for p in paths if METHODS[OmegaConf.load(p).type].tunes_weights]
