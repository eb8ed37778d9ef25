"""PARADE's ablation variants (PARADE Table 6) as configs of the one prompt-aware module:
parameter budgets on LLaMA-2 7B, the one-iteration routing pooler, PARADE-1's last-token pooler,
and targets an architecture lacks."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from papeft.methods.base import build_method
from papeft.methods.prompt_aware import PromptAwareModel
from papeft.methods.vector_generator import CapsulePooler, LastTokenPooler, RoutingPooler, squash
from papeft.paths import group_file
from conftest import VOCAB, tiny_model

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
PAPER_BUDGET = {"parade_3": 9.8e6, "parade_4": 9.4e6}     # PARADE sec. 5 ablation, weights only


def method_cfg(name):
    return group_file("method", name)


def llama2_7b_counts(name):
    with torch.device("meta"):
        return build_method(AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B)), method_cfg(name)).param_counts()


def closed_form(cfg, d=4096, d_ffn=11008, layers=32):
    """Per layer: W_down (d x r) + W_up (r x sum widths) + pooler weights; b_up is the bias."""
    widths = {"q": d, "k": d, "v": d, "gate": d_ffn, "up": d_ffn}
    out = sum(widths[t] for t in cfg["targets"])
    r, K = cfg["r"], cfg["num_capsules"]
    pooler = {"capsule": r * r + K * r,     # W_k: K x r x r/K, v_k: K x r
              "routing": r * r,             # W_k only: the routing logits start at zero
              "last": 0, "mean": 0}[cfg["pooler"]]
    weights = layers * (d * r + r * out + pooler)
    return weights, weights + layers * out


@pytest.mark.parametrize("name", ["parade_1", "parade_2", "parade_3", "parade_4"])
def test_llama2_7b_counts_match_the_closed_form(name):
    counts = llama2_7b_counts(name)
    assert (counts["params_trainable_no_bias"], counts["params_trainable"]) == closed_form(method_cfg(name))


@pytest.mark.parametrize("name", sorted(PAPER_BUDGET))
def test_llama2_7b_counts_are_within_0_1m_of_the_paper(name):
    assert abs(llama2_7b_counts(name)["params_trainable_no_bias"] - PAPER_BUDGET[name]) < 0.1e6


# ---- PARADE-2: the routing pooler ---------------------------------------------------------------
def test_routing_pooler_is_the_squashed_masked_mean_of_capsule_projections():
    torch.manual_seed(0)
    pool = RoutingPooler(r=8, num_capsules=4)
    assert {n for n, _ in pool.named_parameters()} == {"W"}       # no attention vector v_k
    h = torch.randn(3, 6, 8)                                      # (B, T, r)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]).bool()
    out = pool(h, mask)                                           # (B, r)
    m = torch.einsum("btr,krc->bktc", h, pool.W)                  # (B, K, T, c)
    w = mask[:, None, :, None].float()
    expected = squash((m * w).sum(2) / w.sum(2)).reshape(3, 8)
    assert torch.allclose(out, expected, atol=1e-6)
    noisy = torch.where(mask[..., None], h, torch.randn_like(h) * 100)  # change only masked tokens
    assert torch.allclose(pool(noisy, mask), out, atol=1e-6)


def test_routing_differs_from_the_attentional_capsule_pooler():
    torch.manual_seed(0)
    capsule = CapsulePooler(8, 4)
    routing = RoutingPooler(8, 4)
    routing.W.data.copy_(capsule.W.data)
    capsule.v.data.normal_(0, 2.0)                                # strong attention scores
    h, mask = torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool)
    assert not torch.allclose(capsule(h, mask), routing(h, mask), atol=1e-4)


def test_variants_build_the_pooler_they_name():
    poolers = {n: type(build_method(tiny_model(), method_cfg(n)).generators[0].pooler)
               for n in ("parade", "parade_1", "parade_2", "parade_3", "parade_4")}
    assert poolers == {"parade": CapsulePooler, "parade_1": LastTokenPooler, "parade_2": RoutingPooler,
                       "parade_3": CapsulePooler, "parade_4": CapsulePooler}


# ---- PARADE-1: last prompt token ----------------------------------------------------------------
def test_parade_1_pools_the_last_prompt_token():
    m = build_method(tiny_model(), method_cfg("parade_1"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.generators.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("up.bias") else 0.0))
    m.eval()
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    pm = torch.zeros_like(ids)
    pm[0, :6] = 1                                                  # row 0: 6 prompt tokens then response
    pm[1, :9] = 1
    vec = m.prompt_vectors(ids, prompt_mask=pm)[0]                 # layer 0 reads the token embeddings
    emb = m.backbone.get_input_embeddings()(ids[[0, 1], [5, 8]])   # (2, d) last prompt tokens
    expected = m.generators[0](emb[:, None, :], torch.ones(2, 1, dtype=torch.bool))
    assert all(torch.allclose(vec[k], expected[k], atol=1e-6) for k in vec)
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % VOCAB                    # an earlier prompt token
    changed[0, 7] = (changed[0, 7] + 1) % VOCAB                    # a response token
    again = m.prompt_vectors(changed, prompt_mask=pm)[0]
    assert all(torch.equal(vec[k], again[k]) for k in vec)


# ---- targets an architecture lacks (PARADE-3's gate on GPT-2 / GPT-NeoX) -----------------------
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_parade_3_scales_the_targets_the_architecture_has(arch):
    m = build_method(tiny_model(arch), method_cfg("parade_3"))
    assert isinstance(m, PromptAwareModel) and [s.role for s in m.sites] == ["q", "k", "v", "up"]
    strict = {**method_cfg("parade_3"), "skip_absent_targets": False}
    with pytest.raises(ValueError, match="role 'gate' does not exist"):
        build_method(tiny_model(arch), strict)
    with pytest.raises(ValueError, match="role 'qq'"):              # a typo is never skipped
        build_method(tiny_model(arch), {**method_cfg("parade_3"), "targets": ["q", "qq"]})


def test_parade_3_on_llama_scales_all_five():
    m = build_method(tiny_model("llama"), method_cfg("parade_3"))
    assert [s.role for s in m.sites] == ["q", "k", "v", "gate", "up"]
