"""Every method YAML in configs/method/ x every tiny architecture (Llama, Gemma, GPT-2, GPT-NeoX):
a few steps lower the loss on a fixed batch; save + reload on a fresh backbone gives identical
logits; prompt-aware methods are the identity at init and their cached generation equals
recomputing without a cache."""
import pytest
import torch

from papeft.methods import build_method
from papeft.methods.prompt_aware import PromptAwareModel
from papeft.paths import group_file
from conftest import VOCAB, tiny_model, tuned_method_yamls

METHOD_YAMLS = tuned_method_yamls()
ARCHS = ["llama", "gemma", "gpt2", "gpt_neox"]
CELLS = [(y.stem, a) for y in METHOD_YAMLS for a in ARCHS]


def method_cfg(name):
    return group_file("method", name)


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    pm = torch.zeros_like(ids)
    pm[:, :8] = 1
    return ids, torch.ones_like(ids), labels, pm


def build(name, arch):
    torch.manual_seed(0)
    return build_method(tiny_model(arch), method_cfg(name))


def response_loss(m, ids, am, labels, pm):
    logits = m(ids, attention_mask=am, prompt_mask=pm).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)


@pytest.mark.parametrize("name,arch", CELLS)
def test_training_lowers_loss_and_reload_is_exact(name, arch, tmp_path):
    m = build(name, arch)
    ids, am, labels, pm = fixed_batch()
    m.train()
    m.on_train_begin(10)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for step in range(1, 9):
        loss = response_loss(m, ids, am, labels, pm)
        loss.backward()
        opt.step()
        m.on_step_end(step)
        opt.zero_grad()
        first = loss.item() if first is None else first
    m.eval()
    with torch.no_grad():
        assert response_loss(m, ids, am, labels, pm).item() < first
        m.save_adapter(tmp_path)
        fresh = build(name, arch).eval()
        fresh.load_adapter(tmp_path)
        assert torch.equal(fresh(ids, attention_mask=am, prompt_mask=pm).logits,
                           m(ids, attention_mask=am, prompt_mask=pm).logits)


@pytest.mark.parametrize("name,arch", CELLS)
def test_prompt_aware_identity_and_cache(name, arch):
    m = build(name, arch).eval()
    if not isinstance(m, PromptAwareModel):
        pytest.skip(f"{name} is not a prompt-aware vector method")
    ids, am, _, _ = fixed_batch()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, tiny_model(arch)(ids).logits)
        g = torch.Generator().manual_seed(1)
        for pname, p in m.generators.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if pname.endswith("up.bias") else 0.0))
    prompt = ids[:2, :7]
    out = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                     pad_token_id=0, eos_token_id=None)
    seq = prompt
    for _ in range(6):
        pm = torch.zeros_like(seq)
        pm[:, :7] = 1
        with torch.no_grad():
            nxt = m(seq, attention_mask=torch.ones_like(seq), prompt_mask=pm, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, nxt.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
