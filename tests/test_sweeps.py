"""Sweeps: a cpu_* experiment through the submitit local launcher and the report; a failed cell that
does not stop the others; the generated sbatch array script (size, cell mapping, command, requeue)."""
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from papeft.runner.sweep import expand
from conftest import REPO

TINY = ["backbone=tiny_llama", "trainer=smoke", "trainer.progress=false", "task.max_eval_samples=4", "floor_run=false"]


def run_py(args, tmp_path, data, env=()):
    out = subprocess.run([sys.executable, "run.py", *args, f"hydra.sweep.dir={tmp_path}/multirun"],
                         cwd=REPO, env={**os.environ, "PAPEFT_DATA": str(data), **dict(env)},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def test_cpu_experiment_through_local_launcher_then_report(tmp_path, shared_data):
    """cpu_fig2 on a tiny grid (PARADE at two budgets, on COPA: short prompts) as two submitit jobs;
    then tables and Figure 2."""
    sweep = ["experiment=cpu_fig2", *TINY, "trainer.max_steps=6", "trainer.eval_every=3", "method=parade",
             "budget_step=0,1", "task=copa", "seed=0", f"output_root={tmp_path}/runs"]
    run_py(["-m", "hydra/launcher=local", *sweep], tmp_path, shared_data,
           env={"WANDB_DIR": str(tmp_path / "wb"), "WANDB_MODE": "offline"})
    runs = tmp_path / "runs/tiny_llama"
    for name in ("parade_r4", "parade_r8"):
        m = json.loads((runs / name / "copa/seed0/metrics.json").read_text())
        assert m["status"] == "complete" and m["experiment"] == "cpu_fig2" and m["steps"] == 6
    # the jobs Hydra ran are the cells papeft.runner.sweep expands, in the same order
    cells = expand(sweep, launcher="local").cells
    ran = [yaml.safe_load((tmp_path / f"multirun/{i}/.hydra/overrides.yaml").read_text()) for i in range(2)]
    assert [sorted(c) for c in cells] == [sorted(r) for r in ran]
    assert len(list((tmp_path / "wb/wandb").glob("offline-run-*/*.wandb"))) == 2      # wandb, offline, per run
    out = subprocess.run([sys.executable, "-m", "papeft.report", str(runs), "--plots"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    assert "parade_r4" in out.stdout and "parade_r8" in out.stdout
    assert r"\toprule" in (runs / "median.tex").read_text()
    for ext in ("png", "pdf"):
        assert (runs / f"plots/budget-copa.{ext}").stat().st_size > 1000
    assert "budget-copa.png" in (runs / "plots/index.md").read_text()


def test_failed_cell_does_not_stop_the_sweep(tmp_path, shared_data):
    """BoolQ's paper split needs a train file shared/data lacks: that cell fails, COPA's still runs."""
    run_py(["-m", *TINY, "trainer.max_steps=4", "trainer.eval_every=2", "wandb.enabled=false", "task=boolq,copa",
            f"output_root={tmp_path}/runs"],
           tmp_path, shared_data)
    runs = tmp_path / "runs/tiny_llama/parade"
    failed = json.loads((runs / "boolq/seed0/failed.json").read_text())
    assert failed["status"] == "failed" and failed["error_type"] == "DataError"
    assert not (runs / "boolq/seed0/metrics.json").exists()
    assert json.loads((runs / "copa/seed0/metrics.json").read_text())["status"] == "complete"
    out = subprocess.run([sys.executable, "-m", "papeft.report", str(runs)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("| tiny_llama | parade |"))
    assert row.split("|")[4].strip() == "failed"                   # boolq column (sorted first): no number
    assert "Failed runs:" in out.stdout and "DataError" in out.stdout


def make_sbatch(*args):
    out = subprocess.run([sys.executable, "scripts/slurm/make_sbatch.py", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def run_task(script: Path, index: int, tmp_path: Path, srun_rc: int = 0) -> tuple[int, list[str], str]:
    """Run the sbatch script as array task `index` with stub srun/scontrol; (exit, srun argv, scontrol argv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\nexit {srun_rc}\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/scontrol.args\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "scontrol.args").unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": str(index)}
    res = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    srun = (tmp_path / "srun.args").read_text().splitlines() if (tmp_path / "srun.args").exists() else []
    scontrol = (tmp_path / "scontrol.args").read_text().strip() if (tmp_path / "scontrol.args").exists() else ""
    return res.returncode, srun, scontrol


def test_sbatch_array_for_paper_table1(tmp_path):
    text = make_sbatch("experiment=paper_table1", "--dry-run")
    script = tmp_path / "t1.sbatch"
    script.write_text(text)
    params = yaml.safe_load((REPO / "configs/experiment/paper_table1.yaml").read_text())["hydra"]["sweeper"]["params"]
    grid = list(itertools.product(*[[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]))
    assert len(grid) == 8 * 7 * 5
    assert f"#SBATCH --array=0-{len(grid) - 1}%32" in text             # array size = grid size, parallelism
    cells = dict(re.findall(r"^  (\d+)\) CELL=\((.*)\) ;;$", text, flags=re.M))
    assert sorted(map(int, cells)) == list(range(len(grid)))
    assert len(set(cells.values())) == len(grid)                      # each index a distinct cell
    assert [tuple(cells[str(i)].split()) for i in range(len(grid))] == grid   # in Hydra's multirun order
    for i in (0, 137, len(grid) - 1):
        rc, argv, requeue = run_task(script, i, tmp_path)
        assert rc == 0 and not requeue
        assert argv == ["python", "run.py", "experiment=paper_table1", *grid[i],
                        f"hydra.run.dir=results/.hydra/paper_table1/slurm/77_{i}"]
    rc, _, requeue = run_task(script, 5, tmp_path, srun_rc=75)       # pre-empted: checkpoint saved
    assert rc == 75 and requeue == "requeue 77_5"
    rc, _, requeue = run_task(script, 6, tmp_path, srun_rc=1)        # a real failure is not requeued
    assert rc == 1 and not requeue
    assert run_task(script, len(grid), tmp_path)[0] == 2              # no such cell


def test_sbatch_follows_command_line_and_launcher_options(tmp_path):
    text = make_sbatch("experiment=cpu_table6", "method=parade,parade_4", "seed=0", "hydra.launcher.partition=gpu",
                       "--launch", "torchrun", "--gpus", "4", "--dry-run")
    assert "#SBATCH --array=0-5%6" in text and "#SBATCH --partition=gpu" in text and "#SBATCH --gres=gpu:4" in text
    assert "COMMON=(seed=0 experiment=cpu_table6 trainer.distributed=accelerate)" in text
    assert "torchrun --standalone --nnodes 1 --nproc_per_node 4 run.py" in text
    bench = make_sbatch("experiment=paper_table4", "--dry-run")
    assert "--array" not in bench and "scripts/bench_multitenant.py --random-config llama2_7b" in bench


def test_sweep_expansion_order_and_overrides():
    sweep = expand(["experiment=paper_table7", "method=lora", "seed=0,1"])
    assert len(sweep) == 2 * 1 * 3 * 2 and sweep.sizes == {"backbone": 2, "task": 3, "seed": 2}
    assert sweep.cells[0] == ["backbone=gpt2_large", "method=lora", "task=boolq", "seed=0", "experiment=paper_table7"]
    assert sweep.common == ["method=lora", "experiment=paper_table7"]
    assert sweep.varying[-1] == ["backbone=pythia_1_4b", "task=squad", "seed=1"]


def test_progress_tells_finished_failed_started_and_pending_cells_and_the_time_to_go(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from papeft.paths import config_dir
    from papeft.runner.cells import resolved_config, run_dir_for
    from papeft.runner.progress import array_spec, main as progress_main
    from papeft.train.checkpoint import config_hash
    overrides = ["experiment=cpu_table1", f"output_root={tmp_path}", "seed=0,1", "task=sst2", "method=lora,parade"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cpu_table1", f"output_root={tmp_path}", "seed=0",
                                           "task=sst2", "method=lora"])
    done = run_dir_for(cfg, 0)
    done.mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"status": "complete", "cell_time_s": 100.0,
                                                    "config_hash": config_hash(resolved_config(cfg, 0))}))
    (tmp_path / "smollm2_135m/parade/sst2/seed0").mkdir(parents=True)
    (tmp_path / "smollm2_135m/parade/sst2/seed0/failed.json").write_text("{}")
    (tmp_path / "smollm2_135m/parade/sst2/seed1").mkdir(parents=True)
    (tmp_path / "smollm2_135m/parade/sst2/seed1/config.yaml").write_text("seed: 1\n")
    stale = tmp_path / "smollm2_135m/lora/sst2/seed1"                    # finished under another config: rerun
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text(json.dumps({"status": "complete", "config_hash": "0" * 16}))
    assert progress_main([*overrides, "--list"]) == 0
    out = capsys.readouterr().out
    states = [line.split()[:2] for line in out.splitlines() if re.match(r"\s+\d+  ", line)]
    assert states == [["0", "finished"], ["1", "failed"], ["2", "stale"], ["3", "started"]]
    assert "4 cells: 1 finished, 1 failed, 1 stale, 1 started, 0 pending" in out
    assert "to go: about 0.1 h" in out                                    # 3 cells left (failed too) x 100 s
    from papeft.runner.progress import seconds_to_go, cell_states
    assert seconds_to_go(cell_states(overrides)) == 300.0
    assert [s.label for s in cell_states([*overrides[:2], "seed='0..1'", "task=sst2", "method=lora"])] == [
        "lora / sst2 / seed 0", "lora / sst2 / seed 1"]                   # a quoted seed range, as Hydra reads it
    assert "unfinished array indices: 1-3" in out and "failed: parade / sst2 / seed 0" in out
    assert array_spec([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
