"""The shared trainer: best-checkpoint restore, early stopping, response-only loss."""
import contextlib

import pytest
import torch

from papeft.train.checkpoint import NonFiniteLossError
from papeft.train.distributed import Parallel
from papeft.tasks.prompting import Encoded
from papeft.train.trainer import Trainer, TrainerConfig
from papeft.methods import build_method
from conftest import float64, tiny_model


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [Encoded(torch.randint(3, 90, (6,), generator=g).tolist(),
                    torch.randint(3, 90, (2,), generator=g).tolist() + [2]) for _ in range(n)]


def trainer(**kw):
    cfg = TrainerConfig(progress=False, device="cpu", **kw)
    return Trainer(build_method(tiny_model(), {"type": "parade", "r": 4, "num_capsules": 2}), cfg,
                   pad_id=0, eos_id=2, seed=0)


def test_fit_keeps_the_best_dev_checkpoint(tmp_path):
    t = trainer(lr=5e-2, max_steps=12, batch_size=4, micro_batch_size=2, eval_every=2, patience=100)
    train, dev = data(16, 0), data(8, 1)
    before = t.dev_loss(dev)
    fit = t.fit(train, dev, save_dir=tmp_path)
    assert fit["steps"] == 12 and not fit["stopped_early"] and len(fit["history"]) == 6
    best = min(h["dev_loss"] for h in fit["history"])
    assert fit["best_dev_loss"] == best and best < before
    assert abs(t.dev_loss(dev) - best) < 1e-5                     # the restored weights are the best ones
    assert (tmp_path / "adapter.safetensors").exists()


def test_patience_stops_early():
    t = trainer(lr=0.0, max_steps=50, batch_size=4, eval_every=1, patience=3)   # lr 0: dev loss never improves
    fit = t.fit(data(8, 0), data(4, 1))
    assert fit["stopped_early"] and fit["steps"] == 4 and fit["planned_steps"] == 50


def test_loss_covers_response_tokens_only():
    t = trainer()
    ex = Encoded([5, 6, 7, 8], [9, 2])
    ids = torch.tensor([ex.prompt + ex.response])
    with torch.no_grad():
        logits = t.model(ids, prompt_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits[0]
    logp = torch.log_softmax(logits, -1)
    expected = -(logp[3, 9] + logp[4, 2]) / 2            # predicting 9 after the prompt, then the end token
    assert abs(t.dev_loss([ex]) - expected.item()) < 1e-5


class TwoRanks(Parallel):
    """Rank `rank` of a pretend 2-process data-parallel group (no collectives: each rank alone)."""

    def __init__(self, rank):
        super().__init__("none", "cpu")
        self.rank, self.world = rank, 2

    def no_sync(self, model, sync):
        return contextlib.nullcontext()

    def sum(self, *values):
        return values


def test_data_parallel_shards_add_up_to_the_single_process_gradient():
    """Each rank's loss is scaled by world on its slice; DDP averages: the mean of the ranks'
    gradients must equal one process's gradient on the whole batch (odd batch: uneven slices)."""
    batch = data(5, 0)
    grads = []
    for parallel in (None, TwoRanks(0), TwoRanks(1)):
        with float64():                                     # sums over other slices: float64 (conftest)
            t = trainer()
        if parallel is not None:
            t.parallel = parallel
        t.model.train()
        t._accumulate(batch, micro=2)
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
    single, r0, r1 = grads
    assert single and set(single) == set(r0) == set(r1)
    for name in single:
        assert torch.allclose((r0[name] + r1[name]) / 2, single[name], atol=1e-6), name


def test_non_finite_loss_names_the_step():
    t = trainer(lr=1e30, warmup_ratio=0.0, max_steps=6, batch_size=4, eval_every=100)
    with pytest.raises(NonFiniteLossError, match=r"at step 2"):
        t.fit(data(8, 0), data(4, 1))
