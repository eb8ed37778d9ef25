"""One experiment cell end to end: backbone x method x task x seed -> a run directory.

Run directory `{output_root}/{backbone}/{method}/{task}/seed{seed}/` holds
`config.yaml` (resolved), `adapter/` (safetensors + config), `predictions.jsonl`
and, written last and atomically, `metrics.json`: a run that dies leaves no
`metrics.json`, so nothing downstream mistakes it for a finished one.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from papeft.backbones import load_backbone
from papeft.io import write_json, write_jsonl, write_text
from papeft.prompting import PromptFormatter
from papeft.report import write_tables
from papeft.tasks import get_task
from papeft.trainer import Trainer, TrainerConfig
from papeft.tuners import build_method
from papeft.tuners.base import make_config

log = logging.getLogger(__name__)


def parse_seeds(value) -> list[int]:
    """`3` -> [3]; `"0..4"` -> [0, 1, 2, 3, 4] (inclusive); `"0,2"` or [0, 2] -> [0, 2]."""
    if isinstance(value, int):
        return [value]
    text = str(value).strip().strip("[]")
    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split(".."))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"seed={value!r}: expected an integer, a range like 0..4, or a list like 0,1,2") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dir_for(cfg: DictConfig, seed: int) -> Path:
    return Path(cfg.output_root) / cfg.backbone.name / cfg.method.name / cfg.task.name / f"seed{seed}"


def run_single(cfg: DictConfig, seed: int) -> dict:
    out = run_dir_for(cfg, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)           # never leave a stale "finished" marker
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["seed"] = seed
    write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    seed_everything(seed)

    task = get_task(cfg.task.name)
    splits = task.load(cfg.task, cfg.data.root)
    log.info("%s: %d train / %d dev / %d test", task.name, len(splits.train), len(splits.dev), len(splits.test))
    model, tok = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True))
    adapted = build_method(model, OmegaConf.to_container(cfg.method, resolve=True))
    tcfg = make_config(TrainerConfig, OmegaConf.to_container(cfg.trainer, resolve=True), where="trainer")
    fmt = PromptFormatter(tok, cfg.backbone.chat_template, cfg.backbone.get("system_prompt"), tcfg.max_length)
    enc = {name: [fmt.encode(e.prompt, e.response) for e in getattr(splits, name)] for name in ("train", "dev")}

    trainer = Trainer(adapted, tcfg, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=seed)
    fit = trainer.fit(enc["train"], enc["dev"], save_dir=out / "adapter")

    def generate(prompts: list) -> list[str]:
        return trainer.predict([fmt.encode(p) for p in prompts], tok, int(cfg.task.max_new_tokens))

    result = task.evaluate(generate, splits.test)
    score = result.score
    write_jsonl(out / "predictions.jsonl", result.rows)
    artifacts = [str(p) for p in adapted.write_artifacts(out)]
    metrics = {
        "backbone": cfg.backbone.name, "method": cfg.method.name, "task": task.name, "seed": seed,
        "metric": task.metric, "score": score, "metrics": result.metrics, **adapted.param_counts(),
        "train_time_s": fit["train_time_s"], "train_tokens_per_s": fit["train_tokens_per_s"],
        "steps": fit["steps"], "stopped_early": fit["stopped_early"], "batch_size": fit["batch_size"],
        "best_step": fit["best_step"],
        "best_dev_loss": fit["best_dev_loss"], "dev_history": fit["history"],
        "n_train": len(splits.train), "n_dev": len(splits.dev), "n_test": len(splits.test),
        "split_protocol": cfg.task.split_protocol, "notes": list(splits.notes),
        "num_beams": tcfg.num_beams, "device": str(trainer.device), "artifacts": artifacts,
        "status": "complete",
    }
    write_json(out / "metrics.json", metrics)
    print(f"[{cfg.backbone.name} / {cfg.method.name} / {task.name} / seed {seed}] "
          f"test {task.metric} = {score:.2f}  ({len(splits.test)} examples) -> {out}")
    return metrics


def run(cfg: DictConfig) -> list[dict]:
    """Every seed of `cfg.seed`; with more than one, also the median table under results/tables/."""
    seeds = parse_seeds(cfg.seed)
    results = [run_single(cfg, s) for s in seeds]
    if len(seeds) > 1:
        stem = Path(cfg.tables_root) / f"{cfg.backbone.name}-{cfg.method.name}-{cfg.task.name}-seeds{seeds[0]}-{seeds[-1]}"
        paths = write_tables([run_dir_for(cfg, s) for s in seeds], stem)
        print(Path(paths["md"]).read_text())
        print("tables:", ", ".join(str(p) for p in paths.values()))
    return results
