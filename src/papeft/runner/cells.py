"""One experiment cell end to end: backbone x method x task x seed -> a run directory.

Run directory `{output_root}/{backbone}/{method}/{task}/seed{seed}/` holds
`config.yaml` (resolved), `adapter/` (safetensors + config), `predictions.jsonl`
and, written last and atomically, `metrics.json`: a run that dies leaves no
`metrics.json`, so nothing downstream mistakes it for a finished one.

Sweeps that survive (`resume: auto`, the default):
* a cell whose `metrics.json` is complete and whose config hash (recorded, or recomputed from its
  `config.yaml` under today's rules, so a key newly excluded from the hash reruns no finished cell) is
  this config's is skipped (a checkpoint is resumed only under the hash it recorded);
* an unfinished cell resumes from `checkpoint/last.safetensors` (papeft.train.checkpoint), which is
  deleted once `metrics.json` is written;
* a cell that raises writes `failed.json` (error, traceback, checkpoint step). In a Hydra
  multirun the job then returns, so the other cells go on; a single run re-raises.
`resume: never` starts every cell from scratch. Every run logs to wandb (offline unless
WANDB_MODE says otherwise) unless `wandb.enabled: false`.

Before anything is written or loaded, every task, method and trainer key is type- and
range-checked (`read_configs`). One process at a time runs a cell (`cell.lock`,
papeft.runner.cell_lock): a second one names the holder and stops with `CellLocked`, touching
nothing (an error in a single run; logged and skipped in a multirun). A checkpoint that
cannot be resumed stops the cell with a `CheckpointError` naming the file (recorded in
`failed.json`; `resume=never` or deleting it starts over).
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from papeft.backbone.loading import load_backbone
from papeft.runner.cell_lock import CellLock, CellLocked
from papeft.train.checkpoint import CHECKPOINT_DIR, Checkpointer, Preempted, config_hash, peek_step
from papeft.train.distributed import Parallel
from papeft.io import remove_stale_temps, write_json, write_jsonl, write_text
from papeft.tasks.prompting import PromptFormatter
from papeft.report.plots import plot_rational_activations
from papeft.report.provenance import environment, process_git_state
from papeft.report.rows import ZERO_SHOT
from papeft.report.tables import read_json, write_tables
from papeft.tasks import get_task
from papeft.tasks.base import TaskConfig
from papeft.train.trainer import Trainer, TrainerConfig
from papeft.methods import build_method
from papeft.methods.base import AdaptedModel, make_config, method_config

log = logging.getLogger(__name__)

METRICS, FAILED = "metrics.json", "failed.json"
RESUME_MODES = ("auto", "never")
ACTIVATIONS_STEM = "rational_activations"      # PEDRO Figure 2: {stem}.png and {stem}.pdf in the run folder


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


def resolved_config(cfg: DictConfig, seed: int) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["seed"] = seed
    return resolved


def finished_metrics(run_dir: Path, chash: str) -> dict | None:
    """The run's metrics when it finished with this config hash, else None."""
    rec = read_json(run_dir / METRICS)
    if not (isinstance(rec, dict) and rec.get("status") == "complete"):
        return None
    if rec.get("config_hash") == chash:
        return rec
    stored = run_dir / "config.yaml"
    if stored.is_file() and config_hash(OmegaConf.to_container(OmegaConf.load(stored))) == chash:
        # unchanged since it was read: a run starting on this cell deletes metrics.json before its config.yaml
        return rec if read_json(run_dir / METRICS) == rec else None
    return None


class RunConfigs(NamedTuple):
    task: TaskConfig
    method: tuple[Any, Any]           # (the registered method, its config)
    trainer: TrainerConfig


def read_configs(cfg: DictConfig) -> RunConfigs:
    """Every task, method and trainer key of a run, type- and range-checked; an error names the key,
    the value and what is allowed. Nothing is loaded or written."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)   # noqa: E731
    return RunConfigs(get_task(cfg.task.name).parse_config(plain(cfg.task)), method_config(plain(cfg.method)),
                      make_config(TrainerConfig, plain(cfg.trainer), where="trainer"))


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class WandbRun:
    """wandb for one run, on the main process: resolved config, train/dev loss per evaluation, final
    metrics. Mode: `wandb.mode` (defaults to $WANDB_MODE, else offline). Logging never fails a run."""

    def __init__(self, run=None):
        self.run = run

    @classmethod
    def start(cls, cfg: DictConfig, resolved: dict, run_dir: Path, chash: str, seed: int) -> "WandbRun":
        w = cfg.get("wandb")
        if w is None or not w.get("enabled", False):
            return cls()
        try:
            import wandb
            directory = Path(w.get("dir") or run_dir)
            directory.mkdir(parents=True, exist_ok=True)
            experiment = cfg.get("experiment_name") or "adhoc"
            run = wandb.init(project=w.project, entity=w.get("entity"), group=experiment,
                             name=f"{cfg.backbone.name}/{cfg.method.name}/{cfg.task.name}/seed{seed}",
                             id=f"{experiment}-{chash}"[:64], resume="allow", config=resolved,
                             dir=str(directory), mode=w.get("mode") or "offline", tags=list(w.get("tags") or []),
                             job_type=cfg.method.name)
            return cls(run)
        except Exception as exc:                       # noqa: BLE001  logging must not cost the run
            log.warning("wandb off for this run: %s", exc)
            return cls()

    def log_eval(self, record: dict) -> None:
        if self.run is not None:
            self.run.log({"train/loss": record["train_loss"], "dev/loss": record["dev_loss"],
                          "train/lr": record.get("lr")}, step=record["step"])

    def finish(self, summary: dict | None = None, exit_code: int = 0) -> None:
        if self.run is None:
            return
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        self.run.finish(exit_code=exit_code)
        self.run = None


def run_single(cfg: DictConfig, seed: int, raise_on_failure: bool = True) -> dict | None:
    """Train and test one cell; skip it when it finished before; record a failure in failed.json."""
    if cfg.get("bench") is not None:
        raise ValueError(f"experiment {cfg.get('experiment_name')!r} is a benchmark, not a training sweep: "
                         "see the comment at the top of its config")
    resume = str(cfg.get("resume", "auto"))
    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r}; expected one of {RESUME_MODES}")
    out = run_dir_for(cfg, seed)
    resolved = resolved_config(cfg, seed)
    chash = config_hash(resolved)
    label = f"[{cfg.backbone.name} / {cfg.method.name} / {cfg.task.name} / seed {seed}]"
    if resume == "auto" and (done := finished_metrics(out, chash)):
        print(f"{label} finished earlier with this config ({chash}): skipped -> {out}")
        return done
    configs = read_configs(cfg)                 # before the cell is touched or any model is loaded
    parallel = Parallel(configs.trainer.distributed, configs.trainer.device)
    try:
        with CellLock(out, enabled=parallel.is_main):   # a second process on this cell stops here, touching nothing
            return _run_cell(cfg, seed, out, resolved, chash, label, resume, configs, parallel, raise_on_failure)
    except CellLocked as exc:
        if raise_on_failure:
            raise
        log.error("%s %s", label, exc)
        return None


def _run_cell(cfg: DictConfig, seed: int, out: Path, resolved: dict, chash: str, label: str, resume: str,
              configs: RunConfigs, parallel: Parallel, raise_on_failure: bool) -> dict | None:
    """One cell with its lock held: clear what an earlier attempt left, train and test, record a failure."""
    checkpointer = Checkpointer(out / CHECKPOINT_DIR, chash, configs.trainer.checkpoint_every, write=parallel.is_main)
    if parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / CHECKPOINT_DIR, out / "adapter"):   # temp files of writes killed half way
            remove_stale_temps(folder, every=True)
        (out / METRICS).unlink(missing_ok=True)           # never leave a stale "finished" marker
        (out / FAILED).unlink(missing_ok=True)
        if resume == "never":
            checkpointer.clear()
        write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    parallel.barrier()
    tracker = WandbRun.start(cfg, resolved, out, chash, seed) if parallel.is_main else WandbRun()
    try:
        metrics = _train_and_test(cfg, seed, out, chash, parallel, checkpointer, tracker, configs)
    except Preempted as exc:
        tracker.finish(exit_code=1)
        log.warning("%s %s; the same command resumes it", label, exc)
        raise
    except Exception as exc:                            # noqa: BLE001  recorded, then re-raised or returned
        tracker.finish(exit_code=1)
        if parallel.is_main:
            _record_failure(cfg, seed, out, chash, exc)
        log.error("%s failed: %s: %s (see %s)", label, type(exc).__name__, exc, out / FAILED)
        if raise_on_failure:
            raise
        return None
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(summary={"test/score": metrics["score"], "best_dev_loss": metrics["best_dev_loss"],
                            "params_trainable_no_bias": metrics["params_trainable_no_bias"]})
    if parallel.is_main:
        extra = metrics.get("metrics", {})
        judged = (f", judge parsed {extra['n_judged']:.0f}/{extra['n_judged'] + extra['judge_missing']:.0f} replies"
                  if "n_judged" in extra else "")
        print(f"{label} test {metrics['metric']} = {metrics['score']:.2f}  ({metrics['n_test']} examples{judged}) -> {out}")
    return metrics


def _train_and_test(cfg: DictConfig, seed: int, out: Path, chash: str, parallel: Parallel,
                    checkpointer: Checkpointer, tracker: WandbRun, configs: RunConfigs) -> dict:
    started = time.perf_counter()
    seed_everything(seed)
    task = get_task(cfg.task.name)
    splits = task.load(configs.task, cfg.data.root)
    log.info("%s: %d train / %d dev / %d test", task.name, len(splits.train), len(splits.dev), len(splits.test))
    model, tok = load_backbone(OmegaConf.to_container(cfg.backbone, resolve=True))
    adapted = build_method(model, OmegaConf.to_container(cfg.method, resolve=True))
    adapted.set_tokenizer(tok)                      # methods that read prompt text (LoPA's MiniLM encoder)
    tcfg = configs.trainer
    fmt = PromptFormatter(tok, cfg.backbone.chat_template, cfg.backbone.get("system_prompt"), tcfg.max_length)
    enc = {name: [fmt.encode(e.prompt, e.response) for e in getattr(splits, name)] for name in ("train", "dev")}

    trainer = Trainer(adapted, tcfg, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=seed,
                      checkpointer=checkpointer, on_eval=tracker.log_eval, parallel=parallel)
    fit = trainer.fit(enc["train"], enc["dev"], save_dir=out / "adapter" if parallel.is_main else None)

    def generate(prompts: list) -> list[str]:
        budget = min(int(cfg.task.max_new_tokens), tcfg.max_new_tokens or int(cfg.task.max_new_tokens))
        return trainer.predict([fmt.encode(p) for p in prompts], tok, budget)

    tested = time.perf_counter()
    result = task.evaluate(generate, splits.test)
    metrics = {
        "backbone": cfg.backbone.name, "method": cfg.method.name, "method_type": cfg.method.get("type"),
        "task": task.name, "seed": seed, "experiment": cfg.get("experiment_name"), "config_hash": chash,
        "metric": task.metric, "score": result.score, "metrics": result.metrics,
        "majority_class": task.majority_class(splits.train, splits.test), **adapted.param_counts(),
        "train_time_s": fit["train_time_s"], "train_tokens_per_s": fit["train_tokens_per_s"],
        "test_time_s": time.perf_counter() - tested,
        # what the cell cost: this attempt's data, model, training, dev and test, plus the training seconds of
        # the attempts it resumed from (their loading and the steps after their last checkpoint are not known)
        "cell_time_s": time.perf_counter() - started + fit["earlier_attempts_train_s"],
        "steps": fit["steps"], "stopped_early": fit["stopped_early"], "batch_size": fit["batch_size"],
        "best_step": fit["best_step"], "resumed_from_step": fit["resumed_from_step"],
        "best_dev_loss": fit["best_dev_loss"], "dev_history": fit["history"],
        "n_train": len(splits.train), "n_dev": len(splits.dev), "n_test": len(splits.test),
        "split_protocol": cfg.task.split_protocol, "notes": list(splits.notes),
        "num_beams": tcfg.num_beams, "precision": fit["precision"], **parallel.describe(),
        "environment": environment(parallel.device), "status": "complete",
    }
    if parallel.is_main:
        write_jsonl(out / "predictions.jsonl", result.rows)
        metrics["artifacts"] = [str(p) for p in method_figures(adapted, out)]
        write_json(out / METRICS, metrics)
        checkpointer.clear()                               # the run is final: its checkpoint is dead weight
    parallel.barrier()
    return metrics


def method_figures(adapted: AdaptedModel, run_dir: Path) -> list[Path]:
    """Figures of what a method learned, next to its run's results: the learned activation of every
    layer against GELU (PEDRO Figure 2), as PNG and PDF; [] for a method without learned activations."""
    activations = adapted.learned_activations()
    if not activations:
        return []
    return plot_rational_activations(activations, Path(run_dir) / ACTIVATIONS_STEM,
                                     title=f"{adapted.method}: learned activations per layer")


def _record_failure(cfg: DictConfig, seed: int, out: Path, chash: str, exc: BaseException) -> None:
    write_json(out / FAILED, {
        "status": "failed", "backbone": cfg.backbone.name, "method": cfg.method.name, "task": cfg.task.name,
        "seed": seed, "experiment": cfg.get("experiment_name"), "config_hash": chash,
        "error_type": type(exc).__name__, "error": str(exc), "traceback": traceback.format_exc(),
        "checkpoint_step": peek_step(out), "host": os.uname().nodename,
        "time": datetime.datetime.now().isoformat(timespec="seconds")})


def floor_config(cfg: DictConfig) -> DictConfig:
    """The same run with the zero-shot method at seed 0: the frozen backbone on the same splits and decoding."""
    from papeft.paths import composed
    floor = cfg.copy()
    with open_dict(floor):
        floor.method = OmegaConf.create(composed("method", ZERO_SHOT))
        floor.seed = 0
    return floor


def floor_line(cfg: DictConfig, metrics: dict | None, zero: dict | None) -> str:
    """The task's floor beside the score: the majority-class rate and the zero-shot score (the zero_shot
    cell of this config, `floor_config`, run once and then skipped like any finished cell)."""
    parts = []
    majority = (metrics or zero or {}).get("majority_class")
    if majority:
        parts.append(f"majority class ({majority['label']!r}) {majority['score']:.2f}")
    if zero:
        parts.append(f"zero-shot (the frozen backbone) {zero['score']:.2f}")
    score = f"{metrics['metric']} {metrics['score']:.2f} against " if metrics else ""
    return (f"[{cfg.backbone.name} / {cfg.method.name} / {cfg.task.name}] {score}the floor: "
            + ("; ".join(parts) if parts else "unavailable (the zero-shot run failed)"))


def run(cfg: DictConfig) -> list[dict]:
    """Every seed of `cfg.seed`; with more than one, also the median table under results/tables/.

    A failing seed does not stop the others; in a single (non-multirun) run the failure is
    re-raised at the end, so the exit status says so.
    """
    process_git_state()                         # pinned now: commits made while the sweep runs are not its code
    seeds = parse_seeds(cfg.seed)
    multirun = in_multirun()
    results = {s: run_single(cfg, s, raise_on_failure=len(seeds) == 1 and not multirun) for s in seeds}
    if cfg.get("floor_run", False) and read_configs(cfg).method[0].tunes_weights:
        zero = run_single(floor_config(cfg), 0, raise_on_failure=False)     # every rank: the cell has barriers
        if Parallel.is_main_process():
            print(floor_line(cfg, next((m for m in results.values() if m), None), zero))
    if len(seeds) > 1 and any(results.values()) and Parallel.is_main_process():
        name = f"{cfg.backbone.name}-{cfg.method.name}-{cfg.task.name}-seeds{seeds[0]}-{seeds[-1]}"
        stem = Path(cfg.tables_root) / name
        paths = write_tables([run_dir_for(cfg, s) for s in seeds], stem)
        print(Path(paths["md"]).read_text())
        print("tables:", ", ".join(str(p) for p in paths.values()))
    failed = [s for s, m in results.items() if m is None]
    if failed and not multirun:
        raise RuntimeError(f"seeds {failed} failed (see {FAILED} in their run directories) or were being run by "
                           f"another process (logged above)")
    return [m for m in results.values() if m is not None]
