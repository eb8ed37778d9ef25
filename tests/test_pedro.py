"""PEDRO: the rational activation, identity at init, the bi-level step through the real Trainer,
the activation plot and the saved adapter."""
import pytest
import torch
from safetensors.torch import load_file

import papeft.methods.pedro  # noqa: F401  (registers "pedro")
from papeft.tasks.prompting import Encoded
from papeft.train.trainer import Trainer, TrainerConfig
from papeft.methods.base import ADAPTER_WEIGHTS, build_method
from papeft.methods.pedro import PedroModel
from papeft.runner.cells import method_figures
from papeft.methods.rational import PAU_GELU_INIT, RationalActivation
from conftest import VOCAB, tiny_model

PEDRO = {"type": "pedro", "r": 4}


def exact_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / 2 ** 0.5))


def test_rational_starts_within_1e_2_of_gelu_on_pm5():
    x = torch.linspace(-5, 5, 20001, dtype=torch.float64)
    y = RationalActivation()(x.float()).double()
    assert (y - exact_gelu(x)).abs().max() < 1e-2


def test_pau_init_of_the_spec_fits_gelu_on_pm3_only():
    x = torch.linspace(-3, 3, 20001, dtype=torch.float64)
    pau = RationalActivation(PAU_GELU_INIT)
    assert (pau(x.float()).double() - exact_gelu(x)).abs().max() < 1e-3
    far = torch.tensor([5.0])
    assert (pau(far) - exact_gelu(far)).abs().item() > 1.0          # why the default is our [-5, 5] refit


def test_rational_keeps_float32_coefficients_and_computes_in_float32():
    act = RationalActivation().to(torch.bfloat16)                 # a cast must not reach the coefficients
    assert act.numerator.dtype == act.denominator.dtype == torch.float32
    x = torch.linspace(-4, 4, 257).to(torch.bfloat16)
    y = act(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, act(x.float()).to(torch.bfloat16))     # float32 maths, cast back once
    m = build_method(tiny_model(), PEDRO).to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in m.outer_parameters())
    assert m.generators[0].down.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    assert m(ids).logits.dtype == torch.bfloat16                    # a bfloat16 model still runs


def test_rational_coefficients_all_receive_gradient():
    act = RationalActivation()
    act(torch.linspace(-2, 2, 33)).pow(2).sum().backward()
    assert (act.numerator.grad != 0).all() and (act.denominator.grad != 0).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pedro_is_the_backbone_at_init(arch):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    m = build_method(tiny_model(arch), PEDRO).eval()
    assert isinstance(m, PedroModel)
    assert torch.equal(m(ids).logits, tiny_model(arch)(ids).logits)


def test_outer_parameters_are_the_rational_coefficients_of_every_layer():
    m = build_method(tiny_model(), PEDRO)
    outer = m.outer_parameters()
    assert len(outer) == 2 * len(m.generators)
    outer_ids = {id(p) for p in outer}
    names = [n for n, p in m.named_parameters() if id(p) in outer_ids]
    assert all(".act." in n for n in names)
    assert any(p.requires_grad and id(p) not in outer_ids for p in m.parameters())   # VG weights: inner
    assert m.bilevel_options() == {"val_fraction": 0.1, "lr": 1e-3, "weight_decay": 0.0}


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="method.activation"):
        build_method(tiny_model(), {**PEDRO, "activation": "gelu"})
    with pytest.raises(ValueError, match="method.activation"):
        build_method(tiny_model(), {**PEDRO, "activation": "identity"})
    with pytest.raises(ValueError, match="method.val_fraction"):
        build_method(tiny_model(), {**PEDRO, "val_fraction": 1.5})
    with pytest.raises(ValueError, match="method.pooler"):
        build_method(tiny_model(), {**PEDRO, "pooler": "max"})


# ---- the bi-level step through the shared Trainer -------------------------------------------
def examples(n=8):
    g = torch.Generator().manual_seed(4)
    return [Encoded(torch.randint(3, 90, (7,), generator=g).tolist(),
                    torch.randint(3, 90, (2,), generator=g).tolist() + [2]) for _ in range(n)]


def coefficients(m):
    return [p.detach().clone() for p in m.outer_parameters()]


def one_bilevel_step(outer_lr):
    """max_steps=1 with 6 train / 2 D_val examples; records each `_accumulate` call's examples and
    the coefficients' gradients it left behind."""
    torch.manual_seed(0)
    m = build_method(tiny_model(), {**PEDRO, "outer_lr": outer_lr, "val_fraction": 0.25})
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():            # W_up off zero: then *both* batches send gradient to the coefficients
        for gen in m.generators:
            gen.up.weight.copy_(torch.randn(gen.up.weight.shape, generator=g) * 0.5)
    cfg = TrainerConfig(progress=False, device="cpu", lr=1e-2, max_steps=1, batch_size=6, micro_batch_size=6)
    trainer = Trainer(m, cfg, pad_id=0, eos_id=2, seed=0)
    calls = []
    accumulate = trainer._accumulate

    def recording(batch, micro, **kw):
        out = accumulate(batch, micro, **kw)
        calls.append({"examples": [id(e) for e in batch],
                      "coef_grads": [p.grad.clone() for p in m.outer_parameters()]})
        return out

    trainer._accumulate = recording
    data = examples()
    before, down_before = coefficients(m), m.generators[0].down.weight.detach().clone()
    trainer.fit(data, [])
    return m, calls, before, down_before


def test_rational_coefficients_move_only_with_the_d_val_gradient():
    m, calls, before, down_before = one_bilevel_step(outer_lr=1e-3)
    assert len(calls) == 2                                            # inner (D_train), then outer (D_val)
    inner, outer = calls
    assert len(inner["examples"]) == 6 and len(outer["examples"]) == 2
    assert not set(inner["examples"]) & set(outer["examples"])        # D_val is held out of D_train
    assert not torch.equal(m.generators[0].down.weight, down_before)  # the inner step did happen
    g_train, g_val = torch.cat(inner["coef_grads"]), torch.cat(outer["coef_grads"])
    assert (torch.sign(g_train) != torch.sign(g_val)).any()          # the two batches are distinguishable
    delta = torch.cat([a - b for a, b in zip(coefficients(m), before)])
    assert delta.abs().max() > 0
    # Adam's first step moves each coefficient by lr * g / (|g| + eps): the sign of the D_val gradient
    expected = -1e-3 * g_val / (g_val.abs() + 1e-8)
    assert torch.allclose(delta, expected, atol=2e-6)


def test_inner_step_never_touches_the_coefficients():
    m, calls, before, down_before = one_bilevel_step(outer_lr=0.0)
    assert torch.cat(calls[0]["coef_grads"]).abs().max() > 0          # D_train did reach them...
    assert all(torch.equal(a, b) for a, b in zip(coefficients(m), before))   # ...but never stepped them
    assert not torch.equal(m.generators[0].down.weight, down_before)


# ---- artifacts and the saved adapter ----------------------------------------------------------
def perturbed_pedro(seed=1):
    m = build_method(tiny_model(), PEDRO)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def test_write_artifacts_plots_every_layer_as_png_and_pdf(tmp_path):
    paths = method_figures(perturbed_pedro(), tmp_path)
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    assert all(p.parent == tmp_path and p.stat().st_size > 1000 for p in paths)
    png, pdf = sorted(paths, key=lambda p: p.suffix, reverse=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"


def test_save_and_load_roundtrip_includes_the_coefficients(tmp_path):
    m = perturbed_pedro()
    m.save_adapter(tmp_path)
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert sum(k.endswith((".act.numerator", ".act.denominator")) for k in saved) == 2 * len(m.generators)
    fresh = build_method(tiny_model(), PEDRO).eval()
    fresh.load_adapter(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(coefficients(fresh), coefficients(m)))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, m(ids).logits)
        assert not torch.equal(fresh(ids).logits, tiny_model()(ids).logits)


def test_rational_pau_is_a_learnable_bilevel_pedro_variant():
    m = build_method(tiny_model(), {**PEDRO, "activation": "rational_pau"})
    init = torch.tensor(PAU_GELU_INIT[0])
    assert all(torch.allclose(act.numerator, init) for act in m.learned_activations())
    assert len(m.outer_parameters()) == 2 * len(m.generators)
    cfg = TrainerConfig(progress=False, device="cpu", lr=1e-2, max_steps=2, batch_size=3)
    Trainer(m, cfg, pad_id=0, eos_id=2, seed=0).fit(examples(), [])
    assert not torch.allclose(m.learned_activations()[0].numerator, init)   # the outer step moved them


@pytest.mark.parametrize("val_fraction", [0.25, 0.5])
def test_schedule_is_planned_from_d_train_not_the_whole_training_set(val_fraction):
    """One epoch over D_train: ceil(|D_train| / batch) steps, D_val held out first."""
    m = build_method(tiny_model(), {**PEDRO, "val_fraction": val_fraction})
    cfg = TrainerConfig(progress=False, device="cpu", lr=1e-3, max_epochs=1, batch_size=2)
    fit = Trainer(m, cfg, pad_id=0, eos_id=2, seed=0).fit(examples(8), [])
    n_train = 8 - round(val_fraction * 8)
    assert fit["planned_steps"] == fit["steps"] == -(-n_train // 2)
