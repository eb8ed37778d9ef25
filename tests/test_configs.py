"""Every config in configs/ composes through Hydra's compose API, and the knobs mean what they say."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from papeft.runner import cells as runner
from papeft.methods import METHODS
from papeft.tasks import TASKS
from conftest import REPO

CONFIGS = REPO / "configs"
GROUPS = ["backbone", "method", "task", "trainer", "experiment", "hydra/launcher"]


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes(group, option):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}"], return_hydra_config=True)
    runner.read_configs(cfg)                       # every task, method and trainer key passes its checks
    if group == "method":
        assert cfg.method.name == option and cfg.method.type in METHODS
    if group == "task":
        assert cfg.task.name == option and cfg.task.name in TASKS
    if group == "backbone":
        assert cfg.backbone.name == option
    if group == "hydra/launcher":
        assert "submitit" in cfg.hydra.launcher._target_


def test_default_run_is_parade_on_sst2_under_the_cpu_protocol_and_a_cell_of_cpu_table1():
    from papeft.runner.cells import resolved_config
    from papeft.train.checkpoint import config_hash
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config")
        paper = compose("config", overrides=["trainer=default"])
        smoke = compose("config", overrides=["trainer=smoke"])
        cell = compose("config", overrides=["experiment=cpu_table1", "method=parade", "task=sst2", "seed=0"])
    assert (cfg.backbone.name, cfg.method.name, cfg.task.name) == ("smollm2_135m", "parade", "sst2")
    assert cfg.trainer.batch_size == 8 and cfg.trainer.num_beams == 1 and cfg.floor_run
    assert cfg.task.split_protocol == "full_test" and cfg.trainer.max_steps == cfg.cpu_steps.sst2
    assert config_hash(resolved_config(cfg, 0)) == config_hash(resolved_config(cell, 0))   # the same cell
    assert paper.trainer.lr == 1e-4 and paper.trainer.warmup_ratio == 0.06 and paper.trainer.num_beams == 3
    assert paper.task.split_protocol == "paper" and "cuts" not in paper
    assert smoke.trainer.max_steps and smoke.task.max_train_samples and smoke.trainer.patience == paper.trainer.patience
    for name in PAPER:                                          # the paper tables run the paper's protocol
        assert "cpu_steps" not in compose_exp(f"experiment={name}"), name


def test_every_method_and_task_registered_has_a_yaml():
    assert {o for o in options("method")} >= {"parade", "para", "lora"}
    assert set(TASKS) <= set(options("task"))


EXPERIMENTS = options("experiment")
PAPER = [e for e in EXPERIMENTS if e.startswith("paper_")]


def compose_exp(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_names_its_outputs_and_grid(name):
    cfg = compose_exp(f"experiment={name}")
    assert cfg.experiment_name == name
    assert cfg.output_root.startswith(f"results/{name}/runs") and name in cfg.hydra.sweep.dir   # + lr<rate>/ (selections)
    params = cfg.hydra.sweeper.params or {}
    assert bool(params) != ("bench" in cfg)                     # a sweep, or a benchmark pointer (Table 4)
    for group in ("method", "task", "backbone"):                # every swept name has its YAML
        for option in str(params.get(group, "")).split(",") if group in params else []:
            assert option in options(group), f"{name}: {group}={option} has no configs/{group}/{option}.yaml"
    if name.startswith("cpu_") and "bench" not in cfg:
        assert cfg.backbone.name == "smollm2_135m"


def test_every_paper_table_has_a_cpu_twin():
    assert {"paper_table1", "paper_table2", "paper_table3", "paper_table4", "paper_table6", "paper_table7",
            "paper_fig2"} <= set(PAPER)
    for name in PAPER:
        assert f"cpu_{name[len('paper_'):]}" in EXPERIMENTS
    assert compose_exp("experiment=paper_table1").backbone.name == "llama2_7b"


def test_cpu_protocol_splits_run_lengths_and_cuts():
    """trainer=cpu states the CPU protocol once: split per task (dev_only where the train file is absent,
    full_test where a larger labelled test set exists), run length per task, separate dev/test caps."""
    for task, protocol in [("boolq", "dev_only"), ("squad", "dev_only"), ("qnli", "dev_only"), ("copa", "full_test"),
                           ("rte", "full_test"), ("sst2", "full_test"), ("e2e", "paper")]:
        for experiment in ("cpu_table1", "cpu_table7", "cpu_pilot"):
            cfg = compose_exp(f"experiment={experiment}", f"task={task}")
            assert cfg.task.split_protocol == protocol and cfg.task.max_train_samples is None
            assert cfg.task.max_dev_samples == 64 and cfg.trainer.batch_size == 8 and cfg.trainer.num_beams == 1
            assert cfg.trainer.max_steps == cfg.cpu_steps.get(task, 48)
            assert f"{cfg.trainer.max_steps} optimizer steps at batch 8" in cfg.cuts[0]
    assert compose_exp("experiment=cpu_pilot", "task=rte").trainer.max_steps == 32            # the pilot runs longer
    assert compose_exp("experiment=cpu_table1", "task=rte").trainer.max_steps < 32
    assert compose_exp("experiment=cpu_pilot", "task=rte").task.max_test_samples == 64
    assert compose_exp("experiment=cpu_table3").task.max_test_samples == 16


def test_a_selection_run_is_the_table_cell_it_selects():
    """cpu_select's run at the chosen rate has cpu_table1's cell's hash (so it is copied in, not rerun), and
    choosing a rate for one method changes no other method's cells."""
    from papeft.runner.cells import resolved_config
    from papeft.train.checkpoint import config_hash

    def chash(*overrides):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return config_hash(resolved_config(compose("config", overrides=list(overrides)), 0))
    chosen = chash("experiment=cpu_select", "method=ia3", "task=sst2", "trainer.lr=0.01")
    assert chosen == chash("experiment=cpu_table1", "method=ia3", "task=sst2", "++lrs.ia3=0.01")
    assert chosen != chash("experiment=cpu_table1", "method=ia3", "task=sst2", "++lrs.ia3=0.003")
    assert chash("experiment=cpu_table1", "method=lora", "task=rte") == chash(
        "experiment=cpu_table1", "method=lora", "task=rte", "++lrs.ia3=0.003", "cpu_tests.sst2=10")


def test_budget_sweep_sets_rank_and_run_name():
    names = set()
    for method, ranks in [("parade", [4, 8, 12, 24, 48, 96, 192]), ("lora", [1, 2, 4, 8, 16, 32, 64])]:
        for step, r in enumerate(ranks):
            cfg = compose_exp("experiment=paper_fig2", f"method={method}", f"budget_step={step}")
            assert cfg.method.r == r and cfg.method.name == f"{method}_r{r}"
            names.add(cfg.method.name)
    assert len(names) == 14                                     # distinct run directories


def test_benchmark_experiment_refuses_to_train():
    from papeft.runner import cells as runner
    with pytest.raises(ValueError, match="benchmark"):
        runner.run_single(compose_exp("experiment=paper_table4"), 0)


def test_group_file_reads_a_standalone_file_and_names_what_it_cannot():
    from papeft.paths import composed, group_file
    assert group_file("method", "parade") == composed("method", "parade")
    with pytest.raises(FileNotFoundError, match=r"method 'paradee': .*paradee.yaml does not exist; known: \[.*'parade'"):
        group_file("method", "paradee")
    with pytest.raises(ValueError, match=r"copa.yaml has a defaults list: read it with papeft.paths.composed\('task', 'copa'\)"):
        group_file("task", "copa")
