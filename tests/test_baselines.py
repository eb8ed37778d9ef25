"""The non-peft baselines as PARADE App. E configures them ((IA)3, BitFit, Houlsby, Parallel,
AdapterDrop) and peft's standard IA3: parameter budgets on LLaMA-2 7B (meta device), identity
at init, hooks that act where the design says and nowhere else, clear errors for bad configs."""
import dataclasses

import pytest
import torch
from peft import IA3Config, get_peft_model
from peft.tuners.ia3 import IA3Layer
from transformers import AutoModelForCausalLM, LlamaConfig

import papeft.methods.adapters as adapters_mod
import papeft.methods.ia3_peft  # noqa: F401  (registration)
import papeft.methods.projected_vectors  # noqa: F401  (registration)
from papeft.backbone.architectures import decoder_layers, role_sites
from papeft.methods.base import build_method
from papeft.paths import group_file
from conftest import VOCAB, tiny_model

METHODS = ["ia3", "bitfit", "houlsby", "parallel", "adapterdrop", "ia3_peft"]
ARCHS = ["llama", "gemma", "gpt2", "gpt_neox"]
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)


def method_cfg(name, **override):
    cfg = group_file("method", name)
    return {**cfg, **override}


def build(name, arch="llama", **override):
    torch.manual_seed(0)
    return build_method(tiny_model(arch), method_cfg(name, **override)).eval()


def ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def perturb(m, std=0.5):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def capture(module):
    """Register a forward hook after the method's own, so it sees the adapted output."""
    seen = {}
    module.register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out))
    return seen


# ---- budgets on LLaMA-2 7B (PARADE Table 1) ----------------------------------------------------
@pytest.mark.parametrize("name,paper,exact", [
    ("ia3", 9.8e6, 32 * (16 * (4096 + 4096 + 11008) + 3 * 16)),
    ("bitfit", 10.9e6, 32 * (8 * (4 * 4096 + 2 * 11008 + 4096) + 7 * 8)),
    ("houlsby", 9.4e6, 32 * 2 * 2 * 4096 * 18),
    ("parallel", 9.4e6, 32 * 2 * 4096 * 36),
    ("adapterdrop", 9.2e6, 31 * 2 * 2 * 4096 * 18),
    ("ia3_peft", None, 32 * (4096 + 4096 + 11008)),
])
def test_llama2_7b_budget(name, paper, exact):
    with torch.device("meta"):
        m = build_method(AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B)), method_cfg(name))
    counts = m.param_counts()
    assert counts["params_trainable_no_bias"] == exact
    if paper is not None:
        assert abs(exact - paper) <= 0.1e6
    if name in ("houlsby", "parallel", "adapterdrop"):       # adapter biases: one per bottleneck and output
        assert counts["params_trainable"] > counts["params_trainable_no_bias"]
    else:
        assert counts["params_trainable"] == counts["params_trainable_no_bias"]


# ---- identity at init, and the hooks act once the weights move ---------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_identity_at_init_and_not_after_perturbing(name, arch):
    m = build(name, arch)
    x = ids()
    base = tiny_model(arch)(x).logits
    with torch.no_grad():
        assert torch.equal(m(x).logits, base)
        perturb(m)
        assert not torch.allclose(m(x).logits, base, atol=1e-4)


def test_bias_free_roles_are_skipped_only_for_all_linears():
    m = build("bitfit", "gpt2")
    assert sorted(m.vectors[0].keys()) == ["down", "k", "o", "q", "up", "v"]     # GPT-2 has no gate
    with pytest.raises(ValueError, match=r"method\.targets.*gate"):
        build("ia3", "gpt2", targets=["q", "gate"])
    with pytest.raises(ValueError, match=r"method\.targets"):
        build("ia3", "llama", targets=["query"])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_ia3_on_fused_qkv_scales_only_query_and_key(arch):
    m = build("ia3", arch)
    perturb(m)
    sites = {s.role: s for s in role_sites(m.model, ["q", "k", "v"])}
    path = sites["q"].path
    tiny = tiny_model(arch)
    adapted = capture(decoder_layers(m.model)[0].get_submodule(path))
    plain = capture(decoder_layers(tiny)[0].get_submodule(path))
    with torch.no_grad():
        m(ids())
        tiny(ids())
        v = sites["v"].index
        assert torch.equal(adapted["out"][..., v], plain["out"][..., v])            # V untouched
        for role in ("q", "k"):
            i, vec = sites[role].index, m.vectors[0][role]
            scale = 1 + vec.vector @ vec.projection                                  # (d,)
            assert not torch.allclose(scale, torch.ones_like(scale))
            torch.testing.assert_close(adapted["out"][..., i], plain["out"][..., i] * scale)


def test_bitfit_adds_its_projected_vector():
    m = build("bitfit", "llama")
    perturb(m)
    o_proj = decoder_layers(m.model)[1].self_attn.o_proj
    seen_in = {}
    o_proj.register_forward_pre_hook(lambda mod, args: seen_in.__setitem__("x", args[0]))
    seen = capture(o_proj)
    with torch.no_grad():
        m(ids())
        bias = m.vectors[1]["o"]()
        torch.testing.assert_close(seen["out"], torch.nn.functional.linear(seen_in["x"], o_proj.weight) + bias)


# ---- adapters ---------------------------------------------------------------------------------
def test_adapterdrop_has_no_adapters_in_dropped_layers():
    with torch.device("meta"):
        big = build_method(AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B)), method_cfg("adapterdrop"))
    assert [len(a) for a in big.adapters] == [0] + [2] * 31                      # 1 of 32 layers dropped
    m = build("adapterdrop", "llama")                                           # tiny: 2 layers, layer 0 dropped
    assert len(m.adapters[0]) == 0 and sorted(m.adapters[1].keys()) == ["down", "o"]
    assert not any(n.startswith("adapters.0.") for n in m.trainable_state_dict())
    perturb(m)
    layers, tiny = decoder_layers(m.model), tiny_model("llama")
    adapted = [capture(layers[i]) for i in range(2)]
    plain = [capture(decoder_layers(tiny)[i]) for i in range(2)]
    with torch.no_grad():
        m(ids())
        tiny(ids())
    assert torch.equal(adapted[0]["out"], plain[0]["out"])                      # dropped layer: the backbone's
    assert not torch.allclose(adapted[1]["out"], plain[1]["out"], atol=1e-4)


def test_houlsby_wraps_attention_and_ffn_outputs_residually():
    m = build("houlsby", "gpt2")
    perturb(m)
    layer = decoder_layers(m.model)[0]
    for role, module in (("o", layer.attn.c_proj), ("down", layer.mlp.c_proj)):
        seen_in, seen = {}, capture(module)
        module.register_forward_pre_hook(lambda mod, args, s=seen_in: s.__setitem__("x", args[0]))
        with torch.no_grad():
            m(ids())
            y = seen_in["x"] @ module.weight + module.bias                        # Conv1D: weight (in, out)
            torch.testing.assert_close(seen["out"], y + m.adapters[0][role](y))


def test_parallel_adds_adapter_of_layer_input_to_layer_output():
    m = build("parallel", "llama")
    perturb(m)
    layer0 = decoder_layers(m.model)[0]
    seen_in = {}
    layer0.register_forward_pre_hook(lambda mod, args, kw: seen_in.__setitem__("x", args[0] if args
                                                                               else kw["hidden_states"]),
                                     with_kwargs=True)
    adapted = capture(layer0)
    tiny = tiny_model("llama")
    plain = capture(decoder_layers(tiny)[0])
    with torch.no_grad():
        m(ids())
        tiny(ids())
        torch.testing.assert_close(adapted["out"], plain["out"] + m.adapters[0]["block"](seen_in["x"]))


def test_parallel_hook_handles_tuple_layer_outputs():
    adapter = adapters_mod.Bottleneck(8, 2, "relu")
    perturb(adapter)
    x, y = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    out = adapters_mod.AdapterModel._parallel_hook(adapter)(None, (x,), {}, (y, "extra"))
    assert isinstance(out, tuple) and out[1] == "extra"
    torch.testing.assert_close(out[0], y + adapter(x))


@pytest.mark.parametrize("layers,fraction,dropped", [(32, 1 / 32, 1), (30, 1 / 32, 1), (2, 1 / 32, 1),
                                                     (12, 0.0, 0), (10, 0.3, 3)])
def test_dropped_layer_count(layers, fraction, dropped):
    assert adapters_mod.dropped_layers(layers, fraction) == dropped


# ---- bad configs name the key -----------------------------------------------------------------
@pytest.mark.parametrize("name,override,key", [
    ("houlsby", {"bottleneck": 0}, "method.bottleneck"),
    ("parallel", {"activation": "swishy"}, "method.activation"),
    ("adapterdrop", {"drop_fraction": 1.0}, "method.drop_fraction"),
    ("ia3", {"r": 0}, "method.r"),
    ("bitfit", {"vector_init_std": 0.0}, "method.vector_init_std"),
    ("ia3_peft", {"feedforward": ["up"]}, "method.feedforward"),
    ("ia3", {"rank": 4}, "rank"),
])
def test_bad_config_names_the_key(name, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build(name, "llama", **override)


def test_peft_ia3_targets_down_not_attention_output_on_gpt2():
    m = build("ia3_peft", "gpt2")
    names = [n for n in m.trainable_state_dict()]
    assert any(".mlp.c_proj." in n for n in names) and any(".attn.c_attn." in n for n in names)
    assert not any(".attn.c_proj." in n for n in names)
    # the resolved roles are saved: c_attn holds Q, K and V, mlp.c_proj is scaled on its input
    assert dataclasses.asdict(m.config) == {"targets": ["q", "k", "v", "down"], "feedforward": ["down"]}


def ia3_modules(peft_model):
    """{module path in the layer: scaled on its input?} of every IA3 layer in decoder layer 0."""
    return {path: mod.is_feedforward for path, mod in decoder_layers(peft_model)[0].named_modules()
            if isinstance(mod, IA3Layer)}


@pytest.mark.parametrize("arch,expected", [
    ("llama", {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}),
    ("gemma", {"self_attn.q_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}),
    ("gpt2", {"attn.c_attn": False, "mlp.c_proj": True}),
    ("gpt_neox", {"attention.query_key_value": False, "mlp.dense_4h_to_h": True}),
])
def test_peft_ia3_adapts_peft_default_modules(arch, expected):
    ours = ia3_modules(build("ia3_peft", arch).model)
    peft_own = ia3_modules(get_peft_model(tiny_model(arch), IA3Config(task_type="CAUSAL_LM")))  # peft picks
    assert ours == peft_own == expected


def test_peft_ia3_explicit_roles_still_win():
    m = build("ia3_peft", "gemma", targets=["k", "v", "down"], feedforward=["down"])
    assert ia3_modules(m.model) == {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}
