"""The one trainer every method shares (PARADE Appendix E protocol), resumable at any step.

AdamW, linear decay with 6% warm-up, at most `max_epochs` epochs (or
`max_steps`), dev loss every `eval_every` optimizer steps, early stopping after
`patience` evaluations without a lower dev loss, and the best dev checkpoint of
the trainable weights predicts the test set by generation (beam 3 by default).
The loss covers response tokens only, and the LM head runs only at the positions
it reads (papeft.train.loss). `batch_size: auto` is the paper's rule: 16 when the
training set has under 10k examples, else 128; micro-batches with gradient
accumulation keep memory bounded, cut from the step's examples sorted by length.
`precision` (papeft.train.precision) sets the autocast dtype of training, dev loss and
generation; `auto` picks it per device.

Resuming (papeft.train.checkpoint): with a `Checkpointer`, the full training state is saved every
`checkpoint_every` steps, when training ends, and on a pre-emption signal; `fit` starts from it
when one exists for the same config, and replays exactly what an uninterrupted run would do.
A NaN/inf loss or gradient norm stops the run (`NonFiniteLossError`, naming the step) without
touching the last good checkpoint. A method with state outside its trainable weights keeps it
through `AdaptedModel.resume_state()` / `load_resume_state(tensors)` (AdaLoRA's scores).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from papeft.train.checkpoint import (CheckpointError, Checkpointer, NonFiniteLossError, PreemptionGuard,
                               load_optimizer_state, optimizer_state, prefixed, rng_state, set_rng_state, unprefixed)
from papeft.config_checks import Check, above, at_least, between, one_of
from papeft.train.distributed import Parallel
from papeft.train.loss import response_token_loss
from papeft.train.precision import Precision
from papeft.tasks.prompting import Encoded, collate_prompts, collate_train
from papeft.methods.base import AdaptedModel


@dataclass
class TrainerConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_epochs: int = 10
    max_steps: int | None = None         # overrides max_epochs when set
    batch_size: int | str = "auto"       # auto: 16 if train < 10k else 128
    micro_batch_size: int = 16
    sort_micro_batches: bool = True      # cut a step's micro-batches from its examples sorted by length
    eval_batch_size: int = 16
    max_length: int = 2048
    eval_every: int = 200
    patience: int = 10
    max_grad_norm: float = 1.0
    num_beams: int = 3
    max_new_tokens: int | None = None    # caps every task's generation budget (trainer=smoke)
    device: str = "auto"
    precision: str = "auto"              # auto | fp32 | bf16 | fp16 (papeft.train.precision: auto picks per device)
    progress: bool = True
    checkpoint_every: int = 0            # steps between resumable checkpoints; 0: only at the end and on pre-emption
    distributed: str = "none"            # none | accelerate (under `accelerate launch` / `torchrun`)

    # what each key may hold beyond its type; checked when the config is read (config_checks.make_config)
    CHECKS: ClassVar[dict[str, Check]] = {
        "lr": above(0.0), "weight_decay": at_least(0.0), "warmup_ratio": between(0, 1), "max_epochs": at_least(1),
        "max_steps": at_least(1), "batch_size": one_of("auto") | at_least(1), "micro_batch_size": at_least(1),
        "eval_batch_size": at_least(1), "max_length": at_least(1), "eval_every": at_least(1), "patience": at_least(1),
        "max_grad_norm": above(0.0), "num_beams": at_least(1), "max_new_tokens": at_least(1),
        "device": Check("'auto' or a torch device (cpu, cuda, cuda:N, mps)", lambda v: v == "auto" or _is_device(v)),
        "checkpoint_every": at_least(0), "distributed": one_of("none", "accelerate")}

    def effective_batch_size(self, n_train: int) -> int:
        if self.batch_size == "auto":
            return 16 if n_train < 10_000 else 128
        return int(self.batch_size)


@dataclass
class TrainState:
    """Everything of the training loop a resumed run needs besides tensors (JSON in the checkpoint)."""

    step: int = 0
    order: list[int] = field(default_factory=list)     # this epoch's example order
    pos: int = 0                                       # batches of `order` already consumed
    history: list[dict] = field(default_factory=list)
    best_dev_loss: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    stopped_early: bool = False
    finished: bool = False


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def by_length(examples: list[Encoded]) -> list[Encoded]:
    """Shortest first: batches cut from this order carry less padding (a loss sum does not depend on it)."""
    return sorted(examples, key=lambda e: len(e.prompt) + len(e.response))


class OuterStepper:
    """Bi-level optimisation (our reading of PEDRO, first-order DARTS): one outer step per call on
    the next batch of D_val, a fixed slice of train (`val_fraction`, not the run seed)."""

    def __init__(self, trainer: "Trainer", params: list, d_val: list[Encoded], micro: int, opts: dict):
        self.trainer, self.params, self.d_val, self.micro = trainer, params, d_val, micro
        self.optimizer = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
        self.batch_size = trainer.cfg.effective_batch_size(len(d_val))
        self.pos = 0

    def __call__(self) -> None:
        model = self.trainer.model
        model.zero_grad(set_to_none=True)    # drop what the D_train batch left on outer params
        batch = [self.d_val[(self.pos + i) % len(self.d_val)] for i in range(min(self.batch_size, len(self.d_val)))]
        self.pos = (self.pos + len(batch)) % len(self.d_val)
        self.trainer._accumulate(batch, self.micro)
        self.trainer.precision.unscale(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.trainer.cfg.max_grad_norm)
        self.trainer.precision.step(self.optimizer)
        model.zero_grad(set_to_none=True)    # the outer batch never updates inner weights


class Trainer:
    def __init__(self, model: AdaptedModel, cfg: TrainerConfig, pad_id: int, eos_id: int, seed: int,
                 checkpointer: Checkpointer | None = None, on_eval: Callable[[dict], None] | None = None,
                 parallel: Parallel | None = None, token_loss=response_token_loss):
        self.model, self.cfg, self.pad_id, self.eos_id, self.seed = model, cfg, pad_id, eos_id, seed
        self.checkpointer, self.on_eval, self.token_loss = checkpointer, on_eval, token_loss
        self.parallel = parallel or Parallel(cfg.distributed, cfg.device)
        self.device = self.parallel.device
        self.precision = Precision(cfg.precision, self.device)
        self.precision.store_frozen(self.model)
        self.model.to(self.device)
        self.train_model = self.parallel.wrap(self.model)     # the model itself on one process
        self._best: dict[str, torch.Tensor] | None = None

    # ---- training --------------------------------------------------------
    def fit(self, train: list[Encoded], dev: list[Encoded], save_dir=None) -> dict:
        cfg = self.cfg
        if not train:
            raise ValueError("the training split is empty: check task.max_train_samples and the data files")
        if not any(p.requires_grad for p in self.model.parameters()):
            return self._fit_nothing(dev, cfg.effective_batch_size(len(train)), save_dir)
        outer = self.model.outer_parameters()
        d_val: list[Encoded] = []
        if outer:                                  # bi-level: D_val leaves the training set before planning
            d_val, train = self._split_val(train)
        bs = cfg.effective_batch_size(len(train))
        micro = min(cfg.micro_batch_size, bs)
        steps_per_epoch = math.ceil(len(train) / bs)
        total = cfg.max_steps or cfg.max_epochs * steps_per_epoch
        outer_ids = {id(p) for p in outer}
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in outer_ids]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
        gen = torch.Generator().manual_seed(self.seed)
        outer_step = OuterStepper(self, outer, d_val, micro, self.model.bilevel_options()) if outer else None
        parts = {"opt": opt, "sched": sched, "gen": gen, "outer": outer_step}

        self.model.on_train_begin(total)
        st, self._best = TrainState(), None
        try:
            resumed_from = self._restore(st, parts)
        except CheckpointError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:   # this config's, but unusable
            raise CheckpointError(self.checkpointer.path, exc) from exc
        bar = tqdm(total=total, initial=st.step, desc="train", disable=not cfg.progress or not self.parallel.is_main)
        self._start, earlier_s = time.perf_counter() - st.elapsed_s, st.elapsed_s   # earlier attempts' training
        self.model.train()
        with PreemptionGuard() as guard:
            while not st.finished:
                if st.step >= total or st.stopped_early:
                    st.finished = True
                    self._save(st, parts)
                    break
                if st.pos * bs >= len(st.order):                  # a new epoch
                    st.order, st.pos = torch.randperm(len(train), generator=gen).tolist(), 0
                idx = st.order[st.pos * bs:(st.pos + 1) * bs]
                st.pos += 1
                loss_sum = self._step([train[i] for i in idx], micro, params, st, parts)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}")
                if dev and (st.step % cfg.eval_every == 0 or st.step == total):
                    self._evaluate(st, dev, loss_sum, save_dir, sched)
                last = st.step >= total or st.stopped_early               # the final save follows
                if self.checkpointer is not None and self.checkpointer.due(st.step) and not last:
                    self._save(st, parts)
                if self.parallel.any(guard.signum is not None):
                    self._save(st, parts)
                    self.parallel.barrier()
                    guard.handover(st.step)
        bar.close()
        train_time = time.perf_counter() - self._start
        self.model.eval()
        if self._best is not None:
            self.model.load_trainable_state_dict(self._best)
        if save_dir is not None and self.parallel.is_main:
            self.model.save_adapter(save_dir)                     # the weights that predict the test set
        return {"steps": st.step, "planned_steps": total, "stopped_early": st.stopped_early, "batch_size": bs,
                "best_step": st.best_step, "best_dev_loss": st.best_dev_loss if self._best is not None else None,
                "train_time_s": train_time, "train_tokens": st.tokens,
                "train_tokens_per_s": st.tokens / max(train_time, 1e-9), "history": st.history,
                "resumed_from_step": resumed_from, "earlier_attempts_train_s": earlier_s,
                "precision": self.precision.name}

    def _fit_nothing(self, dev: list[Encoded], batch_size: int, save_dir) -> dict:
        """A method with no tunable weight (the zero-shot floor): its dev loss once, no step, no checkpoint."""
        self.model.eval()
        dev_loss = self.dev_loss(dev) if dev else None
        history = [{"step": 0, "train_loss": None, "dev_loss": dev_loss}] if dev else []
        if save_dir is not None and self.parallel.is_main:
            self.model.save_adapter(save_dir)                     # the config alone: no tensor to save
        return {"steps": 0, "planned_steps": 0, "stopped_early": False, "batch_size": batch_size,
                "best_step": 0, "best_dev_loss": dev_loss, "train_time_s": 0.0, "train_tokens": 0,
                "train_tokens_per_s": 0.0, "history": history, "resumed_from_step": None,
                "earlier_attempts_train_s": 0.0, "precision": self.precision.name}

    def _step(self, examples: list[Encoded], micro: int, params: list, st: TrainState, parts: dict) -> float:
        """One optimizer step (plus the outer step of a bi-level method); refuses NaN/inf."""
        loss_sum, n_tok = self._accumulate(examples, micro, regularize=True)
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(self._nonfinite("training loss", loss_sum, st.step + 1))
        self.precision.unscale(parts["opt"])
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        if not math.isfinite(norm) and not self.precision.skips_overflow:    # fp16: the scaler skips the step
            raise NonFiniteLossError(self._nonfinite("gradient norm", norm, st.step + 1) + f" (loss {loss_sum:.4g})")
        self.precision.step(parts["opt"])
        parts["sched"].step()
        st.step += 1
        self.model.on_step_end(st.step)
        parts["opt"].zero_grad(set_to_none=True)
        if parts["outer"] is not None:
            parts["outer"]()
        st.tokens += n_tok
        return loss_sum

    def _evaluate(self, st: TrainState, dev: list[Encoded], train_loss: float, save_dir, sched) -> None:
        dl = self.dev_loss(dev)
        if not math.isfinite(dl):
            raise NonFiniteLossError(self._nonfinite("dev loss", dl, st.step))
        st.history.append({"step": st.step, "train_loss": train_loss, "dev_loss": dl})
        if self.on_eval is not None and self.parallel.is_main:
            self.on_eval({**st.history[-1], "lr": sched.get_last_lr()[0]})
        self.model.train()
        if st.best_dev_loss is None or dl < st.best_dev_loss:
            st.best_dev_loss, st.best_step, st.bad_evals = dl, st.step, 0
            self._best = {k: v.detach().clone() for k, v in self.model.trainable_state_dict().items()}
            if save_dir is not None and self.parallel.is_main:
                self.model.save_adapter(save_dir)
        else:
            st.bad_evals += 1
            st.stopped_early = st.bad_evals >= self.cfg.patience

    def _nonfinite(self, what: str, value: float, step: int) -> str:
        where = self.checkpointer.path if self.checkpointer is not None else None
        kept = f"; the last good checkpoint is kept at {where}" if where is not None and where.exists() else ""
        return (f"non-finite {what} ({value}) at step {step}: training stopped{kept}. "
                f"Lower trainer.lr (now {self.cfg.lr}) or check the data")

    # ---- checkpoints -----------------------------------------------------
    def _save(self, st: TrainState, parts: dict) -> None:
        if self.checkpointer is None:
            return
        st.elapsed_s = time.perf_counter() - self._start
        tensors = prefixed("trainable", self.model.trainable_state_dict())
        if self._best is not None:
            tensors.update(prefixed("best", self._best))
        opt_t, opt_meta = optimizer_state(parts["opt"])
        rng_t, rng_meta = rng_state(parts["gen"])
        tensors.update(prefixed("optim", opt_t), **prefixed("rng", rng_t))
        state = {"train": asdict(st), "optimizer": opt_meta, "scheduler": parts["sched"].state_dict(), "rng": rng_meta,
                 "grad_scaler": self.precision.state_dict()}
        if parts["outer"] is not None:
            outer_t, outer_meta = optimizer_state(parts["outer"].optimizer)
            tensors.update(prefixed("outer_optim", outer_t))
            state.update(outer_optimizer=outer_meta, outer_pos=parts["outer"].pos)
        tensors.update(prefixed("method", self.model.resume_state()))
        self.checkpointer.save(tensors, state)

    def _restore(self, st: TrainState, parts: dict) -> int | None:
        """Load this config's checkpoint into the model, optimizers, RNGs and `st`; its step, or None."""
        loaded = self.checkpointer.load() if self.checkpointer is not None else None
        if loaded is None:
            return None
        tensors, state = loaded
        self.model.load_trainable_state_dict(unprefixed("trainable", tensors))
        best = unprefixed("best", tensors)
        self._best = {k: v.to(self.device) for k, v in best.items()} or None
        load_optimizer_state(parts["opt"], unprefixed("optim", tensors), state["optimizer"])
        parts["sched"].load_state_dict(state["scheduler"])
        set_rng_state(unprefixed("rng", tensors), state["rng"], parts["gen"])
        self.precision.load_state_dict(state.get("grad_scaler", {}))
        if parts["outer"] is not None:
            load_optimizer_state(parts["outer"].optimizer, unprefixed("outer_optim", tensors), state["outer_optimizer"])
            parts["outer"].pos = state["outer_pos"]
        self.model.load_resume_state(unprefixed("method", tensors))
        for key, value in state["train"].items():
            setattr(st, key, value)
        return st.step

    # ---- the pieces every step uses ---------------------------------------
    def _split_val(self, train: list[Encoded]) -> tuple[list[Encoded], list[Encoded]]:
        """(D_val, D_train): a `val_fraction` slice of `train` under a fixed shuffle (not the run seed)."""
        fraction = self.model.bilevel_options()["val_fraction"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234)).tolist()
        n_val = max(1, int(round(fraction * len(train))))
        if n_val >= len(train):
            raise ValueError(f"bi-level val_fraction={fraction} leaves no training examples")
        return [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]

    def _accumulate(self, examples: list[Encoded], micro: int, regularize: bool = False) -> tuple[float, int]:
        """Forward/backward over micro-batches; the loss is the mean over all response tokens.
        Data parallel: this process takes examples[rank::world]; DDP averages, so the loss is scaled by world.
        `regularize`: the method's `step_regularizer` joins the first micro-batch's backward, once per
        optimizer step (every process adds the same term, so DDP's average keeps its weight).
        The returned loss is the token loss alone."""
        n_resp = sum(len(e.response) for e in examples)
        world = self.parallel.world
        mine = self.parallel.shard(examples)
        if self.cfg.sort_micro_batches:                             # the same examples, less padding
            mine = by_length(mine)
        chunks = list(_chunks(mine, micro)) or [examples[:1]]      # an idle process still joins the all-reduce
        weight = 1.0 if mine else 0.0
        loss_sum, n_tok = 0.0, 0
        for i, chunk in enumerate(chunks):
            with self.parallel.no_sync(self.train_model, sync=i == len(chunks) - 1):
                batch = _to(collate_train(chunk, self.pad_id), self.device)
                with self.precision.autocast():
                    loss = self._token_loss(batch, self.train_model).sum() / n_resp
                if world > 1:
                    loss = loss * (world * weight)
                extra = self.model.step_regularizer() if regularize and i == 0 else None
                self.precision.backward(loss if extra is None else loss + extra)
            loss_sum += loss.item() / world
            n_tok += int(batch["attention_mask"].sum()) if mine else 0
        if world > 1:
            loss_sum, n_tok = self.parallel.sum(loss_sum, n_tok)
        return loss_sum, int(n_tok)

    def _token_loss(self, batch: dict, model=None) -> torch.Tensor:
        """Cross-entropy of each response token (N,), run through `model` (default: self.model)."""
        return self.token_loss(self.model, batch, model)

    @torch.no_grad()
    def dev_loss(self, dev: list[Encoded]) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for chunk in _chunks(by_length(self.parallel.shard(dev)), self.cfg.eval_batch_size):
            batch = _to(collate_train(chunk, self.pad_id), self.device)
            n = int((batch["labels"][:, 1:] != -100).sum())
            with self.precision.autocast():
                total += float(self._token_loss(batch).sum())
            count += n
        total, count = self.parallel.sum(total, count)
        return total / max(count, 1)

    # ---- prediction ------------------------------------------------------
    @torch.no_grad()
    def predict(self, prompts: list[Encoded], tokenizer, max_new_tokens: int) -> list[str]:
        """Generate each prompt's response (beam search, `num_beams`), in input order."""
        self.model.eval()
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].prompt))
        mine = [i for chunk in self.parallel.shard(list(_chunks(order, self.cfg.eval_batch_size))) for i in chunk]
        done: list[tuple[int, str]] = []
        bar = tqdm(total=len(mine), desc="predict", disable=not self.cfg.progress or not self.parallel.is_main)
        for idx in _chunks(mine, self.cfg.eval_batch_size):
            batch = _to(collate_prompts([prompts[i] for i in idx], self.pad_id), self.device)
            with self.precision.autocast():
                gen = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                          num_beams=self.cfg.num_beams, eos_token_id=self.eos_id,
                                          pad_token_id=self.pad_id)
            new = gen[:, batch["input_ids"].shape[1]:]
            done += [(i, tokenizer.decode(row, skip_special_tokens=True).strip()) for i, row in zip(idx, new)]
            bar.update(len(idx))
        bar.close()
        out: list[str | None] = [None] * len(prompts)
        for i, text in self.parallel.gather(done):
            out[i] = text
        return out
