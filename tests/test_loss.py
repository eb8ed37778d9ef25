"""The loss makes LM-head outputs only where it reads them, and equals the full-logits loss in fp32."""
import pytest
import torch

from papeft.train.loss import full_logits_token_loss, read_positions, response_token_loss
from papeft.tasks.prompting import Encoded, collate_train
from papeft.train.trainer import Trainer, TrainerConfig
from papeft.methods import build_method
from papeft.paths import group_file
from conftest import tiny_model, tuned_method_yamls

METHODS = [p.stem for p in tuned_method_yamls()]
CELLS = [(m, "llama") for m in METHODS] + [(m, a) for m in ("lora", "parade", "prompt_tuning", "ptuning_v2", "lopa")
                                           for a in ("gemma", "gpt2", "gpt_neox")]


def examples():
    """Prompts and responses of different lengths: right padding, responses at different columns."""
    g = torch.Generator().manual_seed(0)
    sizes = [(6, 3), (9, 2), (4, 5), (7, 1)]
    return [Encoded(torch.randint(3, 90, (p,), generator=g).tolist(), torch.randint(3, 90, (r,), generator=g).tolist())
            for p, r in sizes]


def adapted(name, arch):
    torch.manual_seed(0)
    m = build_method(tiny_model(arch), group_file("method", name))
    with torch.no_grad():                      # move every adapter off its identity init, so it acts on the loss
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    m.on_train_begin(10)
    return m.train()


def loss_and_grads(m, loss_fn, batch):
    m.zero_grad(set_to_none=True)
    per_token = loss_fn(m, batch)
    per_token.sum().backward()
    return per_token.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,arch", CELLS)
def test_loss_at_read_positions_equals_full_logits_loss(name, arch):
    m = adapted(name, arch)
    batch = collate_train(examples(), pad_id=0)
    torch.manual_seed(1)
    new, new_grads = loss_and_grads(m, response_token_loss, batch)
    torch.manual_seed(1)                       # the same dropout masks (LoPA)
    ref, ref_grads = loss_and_grads(m, full_logits_token_loss, batch)
    assert new.shape == (sum(len(e.response) for e in examples()),)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
    assert new_grads.keys() == ref_grads.keys() and new_grads
    for key in ref_grads:
        torch.testing.assert_close(new_grads[key], ref_grads[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["lora", "parade", "prompt_tuning", "ptuning_v2", "lopa", "adalora"])
def test_trainer_runs_the_lm_head_at_read_positions_only(name):
    m = adapted(name, "llama")
    rows = []
    m.backbone.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape))
    t = Trainer(m, TrainerConfig(progress=False, device="cpu", precision="fp32"), pad_id=0, eos_id=2, seed=0)
    t._accumulate(examples(), micro=4)
    n_read = sum(len(e.response) for e in examples())          # each response token and the end token
    assert [s[:-1] for s in rows] == [(n_read,)]               # not (4, T) nor (4, m + T)
    assert t.dev_loss(examples()) > 0 and [s[:-1] for s in rows[1:]] == [(n_read,)]


def test_read_positions_are_the_tokens_before_each_label():
    batch = collate_train([Encoded([5, 6, 7], [8, 2]), Encoded([5], [2])], pad_id=0)
    assert read_positions(batch["labels"]).tolist() == [[False, False, True, True, False],
                                                         [True, False, False, False, False]]


def test_logits_only_at_refuses_positions_that_do_not_fit():
    m = adapted("lora", "llama")
    ids = torch.randint(3, 90, (2, 6))
    with pytest.raises(RuntimeError, match="do not fit"):
        with m.logits_only_at(torch.ones(2, 8, dtype=torch.bool)):
            m(ids)
    assert m.logit_positions is None and m(ids).logits.shape == (2, 6, 97)     # the hook is gone
