"""The floor of every table: the zero-shot method (nothing tuned) and the majority-class rate."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, tiny_model
from papeft.config_checks import make_config
from papeft.methods import build_method
from papeft.tasks import Example, get_task
from papeft.tasks.prompting import Encoded
from papeft.train.trainer import Trainer, TrainerConfig


def examples(words: list[str]) -> list[Example]:
    return [Example(f"t/{i}", f"q{i}", w, (w,)) for i, w in enumerate(words)]


def test_majority_class_is_the_most_frequent_training_label_scored_on_test():
    task = get_task("rte")
    train = examples(["not_entailment"] * 3 + ["entailment"] * 2)
    test = examples(["entailment", "not_entailment", "not_entailment", "not_entailment"])
    assert task.majority_class(train, test) == {"label": "not_entailment", "score": 75.0}
    tie = examples(["no", "yes"])
    assert get_task("boolq").majority_class(tie, examples(["no", "no", "yes", "yes"]))["label"] == "no"


def test_free_text_tasks_have_no_majority_class():
    assert get_task("e2e").majority_class(examples(["a", "a"]), examples(["a"])) is None
    assert get_task("gsm8k").majority_class(examples(["1"]), examples(["1"])) is None


def encoded(n: int, length: int = 6) -> list[Encoded]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 90, (length,), generator=g).tolist()
        out.append(Encoded(ids[:-2], ids[-2:]))
    return out


def test_zero_shot_trains_nothing_and_reports_its_dev_loss(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = build_method(model, {"name": "zero_shot", "type": "zero_shot"})
    assert adapted.param_counts() == {"params_trainable": 0, "params_trainable_no_bias": 0}
    cfg = make_config(TrainerConfig, {"max_steps": 5, "batch_size": 2, "micro_batch_size": 2, "progress": False,
                                      "device": "cpu", "precision": "fp32"}, where="trainer")
    trainer = Trainer(adapted, cfg, pad_id=0, eos_id=1, seed=0)
    fit = trainer.fit(encoded(4), encoded(2), save_dir=tmp_path / "adapter")
    assert fit["steps"] == 0 and fit["train_tokens"] == 0
    assert fit["best_dev_loss"] == pytest.approx(trainer.dev_loss(encoded(2)))
    assert [h["step"] for h in fit["history"]] == [0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "zero_shot" and saved["params_trainable"] == 0


def test_zero_shot_yaml_composes_with_no_keys():
    cfg = OmegaConf.load(REPO / "configs" / "method" / "zero_shot.yaml")
    assert dict(cfg) == {"name": "zero_shot", "type": "zero_shot"}


def test_floor_line_says_what_it_has():
    from omegaconf import OmegaConf
    from papeft.runner.cells import floor_line
    cfg = OmegaConf.create({"backbone": {"name": "b"}, "method": {"name": "lora"}, "task": {"name": "sst2"}})
    metrics = {"metric": "accuracy", "score": 82.8125, "majority_class": {"label": "positive", "score": 48.4375}}
    assert floor_line(cfg, metrics, {"score": 0.0, "majority_class": None}) == (
        "[b / lora / sst2] accuracy 82.81 against the floor: majority class ('positive') 48.44; "
        "zero-shot (the frozen backbone) 0.00")
    assert floor_line(cfg, metrics, None).endswith("the floor: majority class ('positive') 48.44")
    assert floor_line(cfg, None, None) == "[b / lora / sst2] the floor: unavailable (the zero-shot run failed)"
