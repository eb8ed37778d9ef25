"""End to end through run.py: the real backbone's smoke run, seed ranges, multirun + report, atomicity."""
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from papeft.runner import cells as runner
from conftest import REPO

TINY = ["backbone=tiny_llama", "trainer=smoke", "trainer.progress=false", "task.max_eval_samples=4",
        "wandb.enabled=false", "floor_run=false", "task=copa"]


def run_py(args, tmp_path, data_root):
    env = {**os.environ, "PAPEFT_DATA": str(data_root)}
    out = subprocess.run([sys.executable, "run.py", *args, f"output_root={tmp_path}/runs",
                          f"tables_root={tmp_path}/tables", f"hydra.run.dir={tmp_path}/hydra",
                          f"hydra.sweep.dir={tmp_path}/multirun"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


KEYS = {"metric", "score", "params_trainable", "params_trainable_no_bias", "train_time_s",
        "train_tokens_per_s", "status", "seed", "backbone", "method", "task"}


def test_smoke_run_on_the_real_backbone(tmp_path, shared_data):
    stdout = run_py(["trainer=smoke", "trainer.progress=false"], tmp_path, shared_data)
    run = tmp_path / "runs/smollm2_135m/parade/sst2/seed0"      # the main job's task
    metrics = json.loads((run / "metrics.json").read_text())
    assert KEYS <= set(metrics) and metrics["status"] == "complete"
    assert 0 < metrics["train_time_s"] + metrics["test_time_s"] < metrics["cell_time_s"]   # what the run cost
    assert metrics["params_trainable_no_bias"] == 30 * (576 * 12 + 12 * (576 + 192 + 1536) + 192)
    assert 0 <= metrics["score"] <= 100 and "test accuracy" in stdout
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["n_test"] == 16
    assert (run / "adapter/adapter.safetensors").stat().st_size > 0 and (run / "config.yaml").exists()
    env = metrics["environment"]                                   # where the number came from
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["packages"]["peft"]
    assert env["device"].startswith("cpu") and env["git"]["dirty"] in (True, False)
    assert len(env["git"]["commit"]) == 40
    # the floor beside the score: the zero_shot cell of the same config ran once, at seed 0
    floor = json.loads((tmp_path / "runs/smollm2_135m/zero_shot/sst2/seed0/metrics.json").read_text())
    assert floor["steps"] == 0 and floor["n_test"] == 16 and floor["config_hash"] != metrics["config_hash"]
    majority = metrics["majority_class"]
    assert (f"the floor: majority class ({majority['label']!r}) {majority['score']:.2f}; "
            f"zero-shot (the frozen backbone) {floor['score']:.2f}") in stdout


def test_seed_range_writes_median_tables(tmp_path, shared_data):
    run_py([*TINY, "method=lora", "seed=0..1"], tmp_path, shared_data)
    for s in (0, 1):
        assert (tmp_path / f"runs/tiny_llama/lora/copa/seed{s}/metrics.json").exists()
    stem = tmp_path / "tables/tiny_llama-lora-copa-seeds0-1"
    for ext in ("md", "csv", "tex"):
        assert stem.with_suffix(f".{ext}").exists()
    assert "\\toprule" in stem.with_suffix(".tex").read_text()


def test_multirun_then_report(tmp_path, shared_data):
    run_py(["-m", *TINY, "method=para", "seed=0,1"], tmp_path, shared_data)
    runs = tmp_path / "runs/tiny_llama/para/copa"
    assert sorted(p.name for p in runs.iterdir()) == ["seed0", "seed1"]
    out = subprocess.run([sys.executable, "-m", "papeft.report", str(runs)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (runs / "median.md").exists() and "para" in out.stdout


def test_failed_run_leaves_no_metrics(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("PAPEFT_DATA", str(shared_data))
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"output_root={tmp_path}"])
    out = runner.run_dir_for(cfg, 0)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"status": "complete"}')          # a stale earlier result

    def boom(*a, **k):
        raise KeyboardInterrupt("killed during prediction")
    monkeypatch.setattr(runner.Trainer, "predict", boom)
    with pytest.raises(KeyboardInterrupt):
        runner.run_single(cfg, 0)
    assert not (out / "metrics.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_seed_parsing():
    assert runner.parse_seeds(3) == [3]
    assert runner.parse_seeds("0..4") == [0, 1, 2, 3, 4]
    assert runner.parse_seeds("1,3") == [1, 3]
    with pytest.raises(ValueError, match="0..4"):
        runner.parse_seeds("4..0")
