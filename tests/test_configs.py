"""Every config in configs/ composes through Hydra's compose API, and the knobs mean what they say."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from papeft.tuners import METHODS
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
    if group == "method":
        assert cfg.method.name == option and cfg.method.type in METHODS
    if group == "task":
        assert cfg.task.name == option and cfg.task.name in TASKS
    if group == "backbone":
        assert cfg.backbone.name == option
    if group == "hydra/launcher":
        assert "submitit" in cfg.hydra.launcher._target_


def test_default_run_is_parade_on_copa_on_smollm2():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config")
        smoke = compose("config", overrides=["trainer=smoke"])
    assert (cfg.backbone.name, cfg.method.name, cfg.task.name) == ("smollm2_135m", "parade", "copa")
    assert cfg.trainer.lr == 1e-4 and cfg.trainer.warmup_ratio == 0.06 and cfg.trainer.num_beams == 3
    assert smoke.trainer.max_steps and smoke.task.max_train_samples and smoke.trainer.lr != cfg.trainer.lr
    assert smoke.trainer.patience == cfg.trainer.patience            # inherited from default


def test_every_method_and_task_registered_has_a_yaml():
    assert {o for o in options("method")} >= {"parade", "para", "lora"}
    assert set(TASKS) <= set(options("task"))
