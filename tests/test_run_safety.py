"""Nothing is lost: atomic writes killed half way, one process per cell, unreadable checkpoints, and
configs checked before anything is loaded."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from papeft.runner import cells as runner
from papeft.runner.cell_lock import LOCK_FILE, CellLock, CellLocked
from papeft.train.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE, CheckpointError, config_hash, peek_step
from papeft.config_checks import ConfigError
from papeft.io import HOST, write_json
from papeft.report.tables import write_tables
from conftest import REPO

RUN = ["backbone=tiny_llama", "trainer=smoke", "trainer.progress=false", "trainer.max_steps=2", "trainer.batch_size=2",
       "trainer.micro_batch_size=2", "trainer.eval_every=1", "trainer.num_beams=1", "task.max_train_samples=4",
       "task.max_eval_samples=2", "wandb.enabled=false", "floor_run=false", "task=copa"]


def cfg_for(out, *extra):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=[*RUN, f"output_root={out}", *extra])


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- atomic writes


def test_a_write_killed_half_way_leaves_nothing_behind_and_results_get_normal_permissions(tmp_path):
    target = tmp_path / "metrics.json"
    code = ("import os, sys; sys.path.insert(0, 'src'); from papeft.io import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n"
            "    tmp.write_text('{\"status\": \"complete\"}'); os.kill(os.getpid(), 9)")
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".metrics.json.*.tmp"))
    assert len(left) == 1 and "complete" in left[0].read_text() and not target.exists()
    write_json(tmp_path / "other.json", {"x": 1})                      # any later write into the folder
    assert not list(tmp_path.glob(".*.tmp"))
    write_json(target, {"status": "complete"})
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()           # not mkstemp's 0600


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    mine = tmp_path / f".metrics.json.{os.getpid()}-0123abcd@{HOST}.tmp"
    mine.write_text("in progress")
    write_json(tmp_path / "other.json", {})
    assert mine.exists()


# ---------------------------------------------------------------------------- one process per cell


def hold(folder):
    """A separate process that holds the cell's lock until its stdin closes."""
    code = ("import sys; sys.path.insert(0, 'src'); from papeft.runner.cell_lock import CellLock\n"
            f"lock = CellLock({str(folder)!r}).acquire(); print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_names_the_holder_and_touches_nothing(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("PAPEFT_DATA", str(shared_data))
    cfg = cfg_for(tmp_path)
    out = runner.run_dir_for(cfg, 0)
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    (out / CHECKPOINT_DIR / CHECKPOINT_FILE).write_bytes(b"the holder's checkpoint")
    (out / "config.yaml").write_text("the holder's config")
    holder = hold(out)
    try:
        before = snapshot(out)
        with pytest.raises(CellLocked, match=rf"process {holder.pid} on {HOST}"):
            runner.run_single(cfg, 0)
        assert runner.run_single(cfg, 0, raise_on_failure=False) is None     # multirun: logged, skipped
        cli = subprocess.run([sys.executable, "run.py", *RUN, f"output_root={tmp_path}",
                              f"hydra.run.dir={tmp_path}/hydra"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PAPEFT_DATA": str(shared_data)}, timeout=300)
        assert cli.returncode != 0 and f"process {holder.pid}" in cli.stderr + cli.stdout
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    with CellLock(out) as lock:                                          # its lock died with it
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid() and lock.fd is not None


def test_a_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": HOST, "since": "earlier"}))
    with CellLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(CellLocked, match=str(os.getpid())):           # and now it is ours
            CellLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == ""                      # released


# ---------------------------------------------------------------------------- checkpoints that cannot be resumed


def truncated(path, chash):
    save_file({"trainable/x": torch.zeros(1000)}, str(path), metadata={"papeft": "{}"})
    path.write_bytes(path.read_bytes()[:-100])


def garbled_header(path, chash):
    save_file({"x": torch.zeros(2)}, str(path), metadata={"papeft": "{not json"})


def wrong_layout(path, chash):       # this config's hash, but none of the tensors the trainer needs
    state = {"train": {"step": 1}, "optimizer": {}, "scheduler": {}, "rng": {}}
    header = {"format": 1, "config_hash": chash, "state": state}
    save_file({"x": torch.zeros(2)}, str(path), metadata={"papeft": json.dumps(header)})


@pytest.mark.parametrize("corrupt", [truncated, garbled_header, wrong_layout])
def test_an_unreadable_checkpoint_names_the_file_and_the_cell_is_recorded_failed(tmp_path, shared_data,
                                                                                 monkeypatch, corrupt):
    monkeypatch.setenv("PAPEFT_DATA", str(shared_data))
    cfg = cfg_for(tmp_path / "runs")
    out = runner.run_dir_for(cfg, 0)
    ckpt = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    ckpt.parent.mkdir(parents=True)
    corrupt(ckpt, config_hash(runner.resolved_config(cfg, 0)))
    (out / ".metrics.json.k3j4h5g6.tmp").write_text('{"status": "complete"}')   # an older code's killed write
    with pytest.raises(CheckpointError) as info:
        runner.run_single(cfg, 0)
    assert str(ckpt) in str(info.value) and "resume=never" in str(info.value)
    failed = json.loads((out / "failed.json").read_text())
    assert failed["error_type"] == "CheckpointError" and str(ckpt) in failed["error"]
    assert peek_step(out) is None or isinstance(peek_step(out), int)
    assert not list(out.glob(".*.tmp")) and not (out / "metrics.json").exists()
    table = write_tables([tmp_path / "runs"], tmp_path / "median")["md"].read_text()
    assert "| failed |" in table and "CheckpointError" in table


# ---------------------------------------------------------------------------- configs, before any model


@pytest.mark.parametrize("override,named", [
    ("trainer.batch_size=0", "trainer.batch_size=0: expected 'auto' or an integer >= 1"),
    ("trainer.lr=-0.001", "trainer.lr=-0.001: expected a number > 0.0"),
    ("trainer.micro_batch_size=2.5", "trainer.micro_batch_size=2.5: expected an integer"),
    ("trainer.device=gpu", "trainer.device='gpu'"),
    ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio=1.5: expected a number in [0, 1]"),
    ("trainer.progress=maybe", "trainer.progress='maybe': expected true or false"),
    ("+trainer.lr_schedule=cosine", "unknown key(s) ['lr_schedule'] in trainer config"),
    ("task.max_eval_samples=0", "task.max_eval_samples=0: expected an integer >= 1"),
    ("task.split_protocol=random", "task.split_protocol='random'"),
    ("task.split_seed=seven", "task.split_seed='seven': expected an integer"),
    ("+task.max_len=3", "unknown key(s) ['max_len'] in task config"),
    ("method.r=0", "method.r=0: expected an integer >= 1"),
    ("method.targets=[q,query]", "method.targets=['q', 'query']"),
    ("method.pooler=max", "method.pooler='max'"),
])
def test_a_bad_key_stops_the_run_before_any_model_is_loaded(tmp_path, shared_data, monkeypatch, override, named):
    monkeypatch.setenv("PAPEFT_DATA", str(shared_data))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(runner, "load_backbone", no_model)
    cfg = cfg_for(tmp_path, override)
    with pytest.raises(ConfigError) as info:
        runner.run_single(cfg, 0)
    assert named in str(info.value)
    assert not tmp_path.joinpath("tiny_llama").exists()                 # nothing written either


def test_wikisql_keys_are_checked_too(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("PAPEFT_DATA", str(shared_data))
    cfg = cfg_for(tmp_path, "task=wikisql", "task.sql_timeout_s=-1", "task.tables=web")
    with pytest.raises(ConfigError) as info:
        runner.read_configs(cfg)
    assert "task.sql_timeout_s=-1: expected a number > 0.0" in str(info.value)
    assert "task.tables='web': expected one of ['auto', 'local', 'hub']" in str(info.value)
