"""Method registry, LLaMA-2 7B parameter budgets (meta device), adapter save/load, training signal."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from papeft.methods import METHODS, build_method
from conftest import VOCAB, tiny_model

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32)
CONFIGS = {
    "parade": {"type": "parade", "r": 12, "num_capsules": 4},
    "para": {"type": "para", "r": 12, "pooler": "last"},
    "lora": {"type": "lora", "r": 4},
}


def on_meta(method_cfg):
    with torch.device("meta"):
        return build_method(AutoModelForCausalLM.from_config(LLAMA2_7B), method_cfg)


def test_parade_budget_on_llama2_7b():
    counts = on_meta(CONFIGS["parade"]).param_counts()
    # 32 x (4096*12 + 12*19200 + K*r*r/K + K*r) = 8,951,808 weights; b_up adds 32 x 19200
    assert counts["params_trainable_no_bias"] == 32 * (4096 * 12 + 12 * 19200 + 144 + 48) == 8_951_808
    assert counts["params_trainable"] == 8_951_808 + 32 * 19200


def test_lora_budget_on_llama2_7b():
    counts = on_meta(CONFIGS["lora"]).param_counts()
    assert counts["params_trainable"] == counts["params_trainable_no_bias"] == 9_994_240   # "9.99M"


def test_unknown_method_and_key_are_named():
    with pytest.raises(ValueError, match="not registered"):
        build_method(tiny_model(), {"type": "nope"})
    with pytest.raises(ValueError, match="rank"):
        build_method(tiny_model(), {"type": "parade", "rank": 3})
    assert {"parade", "para", "lora"} <= set(METHODS)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100
    pm = torch.zeros_like(ids)
    pm[:, :7] = 1
    return ids, labels, pm


@pytest.mark.parametrize("method", CONFIGS)
def test_save_load_roundtrip_and_training_lowers_loss(method, tmp_path):
    m = build_method(tiny_model(), CONFIGS[method])
    ids, labels, pm = batch()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = m(ids, attention_mask=torch.ones_like(ids), labels=labels, prompt_mask=pm).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all("lora_" not in n and "generators" not in n for n in frozen)
    m.eval()
    m.save_adapter(tmp_path)
    assert (tmp_path / "adapter.safetensors").read_bytes()[:1] != b"\x80"   # not a pickle
    fresh = build_method(tiny_model(), CONFIGS[method]).eval()
    assert not torch.allclose(fresh(ids, prompt_mask=pm).logits, m(ids, prompt_mask=pm).logits)
    fresh.load_adapter(tmp_path)
    assert torch.equal(fresh(ids, prompt_mask=pm).logits, m(ids, prompt_mask=pm).logits)


def test_adapter_for_another_backbone_is_refused(tmp_path):
    build_method(tiny_model(), CONFIGS["parade"]).save_adapter(tmp_path)
    other = build_method(tiny_model("gemma"), CONFIGS["parade"])
    with pytest.raises(ValueError, match="saved for backbone"):
        other.load_adapter(tmp_path)
    with pytest.raises(ValueError, match="method 'parade', not 'lora'"):
        build_method(tiny_model(), CONFIGS["lora"]).load_adapter(tmp_path)
