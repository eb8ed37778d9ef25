"""Role targeting is exact: `up` scales the activation's output on non-gated FFNs, and LoRA's `o` on GPT-2
never reaches the MLP's `c_proj`."""
import pytest
import torch

from papeft.backbone.architectures import ROLE_PATHS, decoder_layers, role_sites
from papeft.methods import build_method
from conftest import VOCAB, tiny_model

NON_GATED = ["gpt2", "gpt_neox"]


def randomised(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 and p.numel() > 16 else 0.0))
    return m.eval()


def logits_with_down_input_scaled(arch, ids, scale_of_layer):
    """The bare backbone with each layer's `down` input (the activation's output) multiplied by hand."""
    bare = tiny_model(arch)
    down = ROLE_PATHS[bare.config.model_type]["down"]
    for i, layer in enumerate(decoder_layers(bare)):
        layer.get_submodule(down).register_forward_pre_hook(
            lambda mod, args, i=i: (args[0] * scale_of_layer(i), *args[1:]))
    with torch.no_grad():
        return bare(ids).logits


@pytest.mark.parametrize("arch", NON_GATED)
def test_up_scales_the_activation_output_on_non_gated_ffns(arch):
    sites = role_sites(tiny_model(arch), ["up"], scaling=True)
    assert [(s.path, s.side) for s in sites] == [(ROLE_PATHS[arch]["down"], "in")]
    m = randomised(build_method(tiny_model(arch), {"type": "parade", "r": 4, "num_capsules": 2, "targets": ["up"]}))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    vecs = m.prompt_vectors(ids)                                         # [layer] {"up": (B, intermediate)}
    with torch.no_grad():
        ours = m(ids).logits
    expected = logits_with_down_input_scaled(arch, ids, lambda i: vecs[i]["up"][:, None, :])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", NON_GATED)
def test_ia3_scales_the_activation_output_on_non_gated_ffns(arch):
    m = randomised(build_method(tiny_model(arch), {"type": "ia3", "r": 4, "targets": ["up"]}))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = m(ids).logits
        expected = logits_with_down_input_scaled(arch, ids, lambda i: 1 + m.vectors[i]["up"]())
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_gated_ffns_scale_up_itself():
    sites = role_sites(tiny_model("llama"), ["q", "up"], scaling=True)
    assert [(s.path, s.side) for s in sites] == [("self_attn.q_proj", "out"), ("mlp.up_proj", "out")]
    # BitFit adds biases to linear outputs: `up` stays the output of c_fc
    assert [(s.path, s.side) for s in role_sites(tiny_model("gpt2"), ["up"])] == [("mlp.c_fc", "out")]


def lora_modules(m):
    return sorted({n.split(".lora_A")[0].split(".h.0.")[-1].split(".layers.0.")[-1]
                   for n, _ in m.named_parameters() if ".lora_A." in n and (".h.0." in n or ".layers.0." in n)})


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_lora_targets_roles_by_path_not_leaf_name(kind):
    assert lora_modules(build_method(tiny_model("gpt2"), {"type": kind, "targets": ["o"]})) == ["attn.c_proj"]
    assert lora_modules(build_method(tiny_model("gpt2"), {"type": kind, "targets": ["down"]})) == ["mlp.c_proj"]
    every = lora_modules(build_method(tiny_model("gpt2"), {"type": kind}))
    assert every == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.mark.parametrize("arch", NON_GATED)
def test_lora_refuses_part_of_a_fused_qkv_module(arch):
    with pytest.raises(ValueError, match="fused module"):
        build_method(tiny_model(arch), {"type": "lora", "targets": ["q", "v"]})
    m = build_method(tiny_model(arch), {"type": "lora", "targets": ["q", "k", "v"]})
    assert lora_modules(m) == [ROLE_PATHS[arch]["q"]]


def test_lora_rejects_an_unknown_role():
    with pytest.raises(ValueError, match="method.targets"):
        build_method(tiny_model("llama"), {"type": "lora", "targets": ["q", "qq"]})


def test_bitfit_key_bias_has_zero_gradient_on_gpt2():
    """A constant added to every key cancels in the softmax (README's readings): zero gradient, up to rounding."""
    m = randomised(build_method(tiny_model("gpt2"), {"type": "bitfit", "r": 4}), seed=3).train()
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    m(ids).logits.square().mean().backward()
    for part in ("vector", "projection"):
        k, q = (getattr(m.vectors[0][role], part).grad.abs().max().item() for role in ("k", "q"))
        assert q > 1e-7 and k < 1e-4 * q, (part, k, q)          # observed k / q ~ 1e-7
