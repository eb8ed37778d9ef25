"""trainer.precision: autocast in training, dev loss and generation; storage; fp16 loss scaling; defaults."""
import pytest
import torch

from papeft.train import precision as precision_mod
from papeft.tasks.prompting import Encoded
from papeft.train.trainer import Trainer, TrainerConfig
from papeft.methods import build_method
from conftest import tiny_model


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [Encoded(torch.randint(3, 90, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist(),
                    torch.randint(3, 90, (2,), generator=g).tolist() + [2]) for _ in range(n)]


def trainer(method="lora", **kw):
    cfg = TrainerConfig(progress=False, device="cpu", lr=1e-2, max_steps=2, batch_size=4, micro_batch_size=2, **kw)
    m = build_method(tiny_model(), {"type": method, **({"r": 4, "num_capsules": 2} if method == "parade" else {})})
    return Trainer(m, cfg, pad_id=0, eos_id=2, seed=0)


def matmul_dtypes(t):
    """Output dtypes of the backbone's first frozen Linear (q_proj's base layer), call by call."""
    seen = []
    layer = t.model.backbone.model.layers[0].self_attn.q_proj
    layer = getattr(layer, "base_layer", layer)
    layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("method", ["lora", "parade"])
def test_bf16_computes_in_bf16_and_keeps_trainable_state_fp32(method):
    t = trainer(method, precision="bf16")
    assert t.precision.name == "bf16"
    frozen = [p for p in t.model.parameters() if not p.requires_grad]
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    inv_freq = dict(t.model.backbone.named_buffers())["model.rotary_emb.inv_freq"]
    assert inv_freq.dtype == torch.float32                                   # buffers never cast
    seen = matmul_dtypes(t)
    fit = t.fit(data(8, 0), data(4, 1))
    assert fit["precision"] == "bf16" and fit["steps"] == 2
    assert seen and set(seen) == {torch.bfloat16}                            # training and dev loss
    assert all(p.dtype == torch.float32 for p in trainable)
    seen.clear()
    out = t.predict(data(2, 2), _Tok(), max_new_tokens=2)
    assert len(out) == 2 and seen and set(seen) == {torch.bfloat16}          # generation follows the setting


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids.tolist()))


def test_optimizer_state_stays_fp32_under_bf16():
    t = trainer("lora", precision="bf16")
    params = [p for p in t.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    t.model.train()
    t._accumulate(data(4, 0), micro=2)
    assert all(p.grad.dtype == torch.float32 for p in params if p.grad is not None)
    t.precision.step(opt)
    states = [s for p in params for s in opt.state[p].values() if torch.is_tensor(s) and s.dim() > 0]
    assert states and all(s.dtype == torch.float32 for s in states)


def test_fp32_changes_nothing_and_matches_the_default_loss():
    ref = trainer("lora", precision="fp32")
    assert all(p.dtype == torch.float32 for p in ref.model.parameters())
    dev = data(6, 3)
    bf16 = trainer("lora", precision="bf16")
    a, b = ref.dev_loss(dev), bf16.dev_loss(dev)
    assert a != b and abs(a - b) < 0.05 * abs(a)                             # close, not the same computation


def test_fp16_scales_the_loss_and_skips_an_overflowing_step():
    t = trainer("lora", precision="fp16")
    assert t.precision.scaler is not None
    init = {k: v.clone() for k, v in t.model.trainable_state_dict().items()}
    fit = t.fit(data(8, 0), [])
    assert fit["steps"] == 2 and fit["precision"] == "fp16"
    assert any(not torch.equal(init[k], v) for k, v in t.model.trainable_state_dict().items())   # it trains
    before = {k: v.clone() for k, v in t.model.trainable_state_dict().items()}
    t.precision.scaler.update(new_scale=torch.tensor(3e38))   # the next scaled gradients overflow
    t.cfg.max_steps = 1
    t.fit(data(8, 0), [])                                      # no NonFiniteLossError: the step is skipped
    after = t.model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert t.precision.scaler.get_scale() < 3e38


def test_auto_picks_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: False)
    assert precision_mod.resolve("auto", cpu) == "fp32"
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: True)
    assert precision_mod.resolve("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision_mod.resolve("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision_mod.resolve("auto", cuda) == "fp16"
    assert precision_mod.resolve("fp16", cpu) == "fp16"
    with pytest.raises(ValueError, match="trainer.precision='half'"):
        precision_mod.resolve("half", cpu)
