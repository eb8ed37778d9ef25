"""Runs that survive: kill (SIGKILL, SIGTERM) and restart with the same command, skip finished cells,
record failures, refuse NaN losses, and checkpoint pieces that round-trip exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from papeft.runner import cells as runner
from papeft.train.checkpoint import (CHECKPOINT_DIR, CHECKPOINT_FILE, EXIT_PREEMPTED, Checkpointer, NonFiniteLossError,
                               config_hash, load_optimizer_state, optimizer_state, peek_step, rng_state, set_rng_state)
from conftest import REPO, data_root

# 12 optimizer steps, dev loss every 2, a checkpoint every 3: 16 train / 4 dev / 4 test examples.
RUN = ["backbone=tiny_llama", "trainer=smoke", "trainer.progress=false", "trainer.max_steps=12",
       "trainer.batch_size=2", "trainer.micro_batch_size=2", "trainer.eval_every=2", "trainer.checkpoint_every=3",
       "trainer.num_beams=1", "task.max_train_samples=16", "task.max_eval_samples=4", "wandb.enabled=false",
       "floor_run=false", "task=copa"]
SAME = ("score", "best_dev_loss", "dev_history", "best_step", "steps", "params_trainable")
# run.py with every optimizer step slowed down (results unchanged) so a test can kill it between checkpoints
SLOW_RUN = ("import sys, time, runpy; sys.path.insert(0, 'src'); import papeft.train.trainer as t; step = t.Trainer._step; "
            "t.Trainer._step = lambda self, *a: (time.sleep(0.4), step(self, *a))[1]; "
            "sys.argv = ['run.py', *sys.argv[1:]]; runpy.run_path('run.py', run_name='__main__')")


def cfg_for(out, *extra):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=[*RUN, f"output_root={out}", *extra])


def run_dir(root):
    return root / "tiny_llama/parade/copa/seed0"


@pytest.fixture(scope="module")
def data():
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"data root {root} not found (set PAPEFT_DATA)")
    os.environ["PAPEFT_DATA"] = str(root)                       # read by the composed configs
    return root


class FakeWandb:
    """Stands in for the wandb module: records init arguments, logged rows, summary, exit code."""

    def __init__(self):
        self.kwargs, self.rows, self.summary, self.exit_code = None, [], {}, None

    def init(self, **kwargs):
        self.kwargs = kwargs
        return self

    def log(self, row, step):
        self.rows.append((step, row))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


WANDB = FakeWandb()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One uninterrupted run (in process, logging to a stand-in wandb): its run directory."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", WANDB)
        mp.delenv("WANDB_MODE", raising=False)
        runner.run_single(cfg_for(root, "wandb.enabled=true"), 0)
    return run_dir(root)


def test_run_logs_config_losses_and_metrics_to_wandb_offline(reference):
    metrics = json.loads((reference / "metrics.json").read_text())
    assert WANDB.kwargs["mode"] == "offline" and WANDB.kwargs["name"] == "tiny_llama/parade/copa/seed0"
    assert WANDB.kwargs["config"]["trainer"]["max_steps"] == 12 and WANDB.kwargs["config"]["seed"] == 0
    assert [(step, row["dev/loss"], row["train/loss"]) for step, row in WANDB.rows] == \
        [(h["step"], h["dev_loss"], h["train_loss"]) for h in metrics["dev_history"]]
    assert len(WANDB.rows) == 6 and WANDB.summary["test/score"] == metrics["score"] and WANDB.exit_code == 0


def start(root, data, slow=True):
    args = [*RUN, f"output_root={root}", f"hydra.run.dir={root}/hydra"]
    cmd = [sys.executable, "-c", SLOW_RUN, *args] if slow else [sys.executable, "run.py", *args]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PAPEFT_DATA": str(data)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(proc, path, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before a checkpoint was written:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def assert_same_metrics(run, reference):
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert got["status"] == "complete" and got["resumed_from_step"] is not None
    assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}
    assert got["config_hash"] == want["config_hash"]
    assert got["cell_time_s"] > got["train_time_s"] + got["test_time_s"]   # earlier attempts' training counted
    assert not (run / CHECKPOINT_DIR).exists()                   # a finished run drops its checkpoint


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, data, reference, sig):
    ckpt = run_dir(tmp_path) / CHECKPOINT_DIR / CHECKPOINT_FILE
    proc = start(tmp_path, data)
    wait_for_checkpoint(proc, ckpt)
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0]
    step = peek_step(run_dir(tmp_path))
    assert 3 <= step < 12 and not (run_dir(tmp_path) / "metrics.json").exists()
    if sig == signal.SIGTERM:                                    # saved at the next step boundary, then exit 75
        assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
        assert "caught SIGTERM" in out and "pre-empted by SIGTERM" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    restart = start(tmp_path, data, slow=False)
    out = restart.communicate(timeout=600)[0]
    assert restart.returncode == 0, out[-3000:]
    assert_same_metrics(run_dir(tmp_path), reference)
    assert json.loads((run_dir(tmp_path) / "metrics.json").read_text())["resumed_from_step"] == step


def test_finished_run_is_skipped_and_another_config_is_not(tmp_path, reference, monkeypatch):
    shutil.copytree(reference, run_dir(tmp_path))
    def no_training(*a, **k):
        raise AssertionError("trained a finished run")
    monkeypatch.setattr(runner.Trainer, "fit", no_training)
    before = (run_dir(tmp_path) / "metrics.json").read_text()
    assert runner.run_single(cfg_for(tmp_path), 0)["score"] == json.loads(before)["score"]
    assert (run_dir(tmp_path) / "metrics.json").read_text() == before
    # a hash recorded under older hashing rules: recomputed from the run's config.yaml, it is still this config
    recorded = {**json.loads(before), "config_hash": "0" * 16}
    (run_dir(tmp_path) / "metrics.json").write_text(json.dumps(recorded))
    assert runner.run_single(cfg_for(tmp_path), 0)["score"] == recorded["score"]
    # a result-changing key (lr) is another config: no skip; the failure is recorded, never a number
    with pytest.raises(AssertionError, match="trained a finished run"):
        runner.run_single(cfg_for(tmp_path, "trainer.lr=0.5"), 0)
    assert not (run_dir(tmp_path) / "metrics.json").exists()
    failed = json.loads((run_dir(tmp_path) / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["error_type"] == "AssertionError"
    assert "trained a finished run" in failed["error"] and failed["task"] == "copa"
    # a key that cannot change the result (progress bars, checkpoint frequency, another method's entry in
    # the CPU protocol's tables) keeps the hash
    base = runner.resolved_config(cfg_for(tmp_path), 0)
    other = runner.resolved_config(cfg_for(tmp_path / "elsewhere", "trainer.progress=true",
                                           "trainer.checkpoint_every=5", "wandb.enabled=true",
                                           "+lrs.lora=0.1", "+cpu_steps.sst2=3"), 0)
    assert config_hash(base) == config_hash(other) != config_hash(runner.resolved_config(cfg_for(tmp_path), 1))


def test_a_cell_restarted_while_its_config_is_read_is_not_finished(tmp_path, reference, monkeypatch):
    """A run starting on the cell deletes metrics.json and then writes its config.yaml: a check that read the
    old metrics and the new config must not call the cell finished."""
    shutil.copytree(reference, run_dir(tmp_path))
    metrics = run_dir(tmp_path) / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "config_hash": "0" * 16}))  # older rules
    chash = config_hash(runner.resolved_config(cfg_for(tmp_path), 0))
    assert runner.finished_metrics(run_dir(tmp_path), chash) is not None
    load = runner.OmegaConf.load

    def restarted_meanwhile(path):
        metrics.unlink()
        return load(path)
    monkeypatch.setattr(runner.OmegaConf, "load", restarted_meanwhile)
    assert runner.finished_metrics(run_dir(tmp_path), chash) is None


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, data):
    cfg = cfg_for(tmp_path, "trainer.lr=1e30", "trainer.checkpoint_every=1", "trainer.warmup_ratio=0")
    with pytest.raises(NonFiniteLossError, match=r"non-finite (training loss|gradient norm) \(.*\) at step 2") as err:
        runner.run_single(cfg, 0)
    out = run_dir(tmp_path)
    assert "last good checkpoint is kept" in str(err.value)
    assert peek_step(out) == 1 and not (out / "metrics.json").exists()
    failed = json.loads((out / "failed.json").read_text())
    assert failed["error_type"] == "NonFiniteLossError" and failed["checkpoint_step"] == 1


def test_checkpoint_pieces_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_state(opt)
    gen = torch.Generator().manual_seed(5)
    rng_t, rng_meta = rng_state(gen)
    ck = Checkpointer(tmp_path, "hash-a")
    ck.save({**{f"o/{k}": v for k, v in tensors.items()}, **{f"r/{k}": v for k, v in rng_t.items()}},
            {"optimizer": meta, "rng": rng_meta, "train": {"step": 7}})
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    draws = (torch.rand(3), np.random.rand(2), torch.randperm(9, generator=gen))
    loaded, state = ck.load()
    set_rng_state({k[2:]: v for k, v in loaded.items() if k.startswith("r/")}, state["rng"], gen)
    again = (torch.rand(3), np.random.rand(2), torch.randperm(9, generator=gen))
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and torch.equal(draws[2], again[2])
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    load_optimizer_state(opt2, {k[2:]: v for k, v in loaded.items() if k.startswith("o/")}, state["optimizer"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    assert state["train"] == {"step": 7}
    assert Checkpointer(tmp_path, "hash-b").load() is None       # another config's checkpoint is never resumed
