"""The one trainer every method shares (PARADE Appendix E protocol).

AdamW, linear decay with 6% warm-up, at most `max_epochs` epochs (or
`max_steps`), dev loss every `eval_every` optimizer steps, early stopping after
`patience` evaluations without a lower dev loss, and the best dev checkpoint of
the trainable weights predicts the test set by generation (beam 3 by default).
The loss covers response tokens only. `batch_size: auto` is the paper's rule:
16 when the training set has under 10k examples, else 128; micro-batches with
gradient accumulation keep memory bounded.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from papeft.prompting import Encoded, collate_prompts, collate_train
from papeft.tuners.base import AdaptedModel


@dataclass
class TrainerConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_epochs: int = 10
    max_steps: int | None = None         # overrides max_epochs when set
    batch_size: int | str = "auto"       # auto: 16 if train < 10k else 128
    micro_batch_size: int = 16
    eval_batch_size: int = 16
    max_length: int = 2048
    eval_every: int = 200
    patience: int = 10
    max_grad_norm: float = 1.0
    num_beams: int = 3
    device: str = "auto"
    progress: bool = True

    def effective_batch_size(self, n_train: int) -> int:
        if self.batch_size == "auto":
            return 16 if n_train < 10_000 else 128
        return int(self.batch_size)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Trainer:
    def __init__(self, model: AdaptedModel, cfg: TrainerConfig, pad_id: int, eos_id: int, seed: int):
        self.model, self.cfg, self.pad_id, self.eos_id, self.seed = model, cfg, pad_id, eos_id, seed
        self.device = pick_device(cfg.device)
        self.model.to(self.device)

    # ---- training --------------------------------------------------------
    def fit(self, train: list[Encoded], dev: list[Encoded], save_dir=None) -> dict:
        cfg = self.cfg
        if not train:
            raise ValueError("the training split is empty: check task.max_train_samples and the data files")
        bs = cfg.effective_batch_size(len(train))
        micro = min(cfg.micro_batch_size, bs)
        steps_per_epoch = math.ceil(len(train) / bs)
        total = cfg.max_steps or cfg.max_epochs * steps_per_epoch
        outer = self.model.outer_parameters()
        outer_ids = {id(p) for p in outer}
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in outer_ids]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
        gen = torch.Generator().manual_seed(self.seed)
        outer_step = None
        if outer:
            outer_step, train = self._outer_stepper(outer, train, micro)

        best = {"dev_loss": math.inf, "step": 0, "state": None}
        history, bad_evals, step, tokens, stopped_early = [], 0, 0, 0, False
        bar = tqdm(total=total, desc="train", disable=not cfg.progress)
        start = time.perf_counter()
        self.model.train()
        self.model.on_train_begin(total)
        while step < total and not stopped_early:
            order = torch.randperm(len(train), generator=gen).tolist()
            for idx in _chunks(order, bs):
                if step >= total:
                    break
                loss_sum, n_tok = self._accumulate([train[i] for i in idx], micro)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                self.model.on_step_end(step)
                opt.zero_grad(set_to_none=True)
                if outer_step is not None:
                    outer_step()
                tokens += n_tok
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}")
                if dev and (step % cfg.eval_every == 0 or step == total):
                    dl = self.dev_loss(dev)
                    history.append({"step": step, "train_loss": loss_sum, "dev_loss": dl})
                    self.model.train()
                    if dl < best["dev_loss"]:
                        best.update(dev_loss=dl, step=step, state={
                            k: v.detach().clone() for k, v in self.model.trainable_state_dict().items()})
                        bad_evals = 0
                        if save_dir is not None:
                            self.model.save_adapter(save_dir)
                    else:
                        bad_evals += 1
                        if bad_evals >= cfg.patience:
                            stopped_early = True
                            break
        bar.close()
        train_time = time.perf_counter() - start
        self.model.eval()
        if best["state"] is not None:
            self.model.load_trainable_state_dict(best["state"])
        elif save_dir is not None:
            self.model.save_adapter(save_dir)
        return {"steps": step, "planned_steps": total, "stopped_early": stopped_early, "batch_size": bs, "best_step": best["step"],
                "best_dev_loss": best["dev_loss"] if best["state"] is not None else None,
                "train_time_s": train_time, "train_tokens": tokens,
                "train_tokens_per_s": tokens / max(train_time, 1e-9), "history": history}

    def _outer_stepper(self, outer: list, train: list[Encoded], micro: int):
        """Bi-level optimisation (our reading of PEDRO, first-order DARTS): D_val is a fixed slice of
        train (`val_fraction`, not the run seed); each call takes one outer step on the next D_val batch."""
        opts = self.model.bilevel_options()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234)).tolist()
        n_val = max(1, int(round(opts["val_fraction"] * len(train))))
        if n_val >= len(train):
            raise ValueError(f"bi-level val_fraction={opts['val_fraction']} leaves no training examples")
        d_val = [train[i] for i in order[:n_val]]
        opt = torch.optim.AdamW(outer, lr=opts["lr"], weight_decay=opts["weight_decay"])
        bs = self.cfg.effective_batch_size(len(train))
        state = {"pos": 0}

        def step() -> None:
            self.model.zero_grad(set_to_none=True)    # drop what the D_train batch left on outer params
            batch = [d_val[(state["pos"] + i) % len(d_val)] for i in range(min(bs, len(d_val)))]
            state["pos"] = (state["pos"] + len(batch)) % len(d_val)
            self._accumulate(batch, micro)
            torch.nn.utils.clip_grad_norm_(outer, self.cfg.max_grad_norm)
            opt.step()
            self.model.zero_grad(set_to_none=True)    # the outer batch never updates inner weights

        return step, [train[i] for i in order[n_val:]]

    def _accumulate(self, examples: list[Encoded], micro: int) -> tuple[float, int]:
        """Forward/backward over micro-batches; the loss is the mean over all response tokens."""
        n_resp = sum(len(e.response) for e in examples)
        loss_sum, n_tok = 0.0, 0
        for chunk in _chunks(examples, micro):
            batch = _to(collate_train(chunk, self.pad_id), self.device)
            loss = self._token_loss(batch).sum() / n_resp
            loss.backward()
            loss_sum += loss.item()
            n_tok += int(batch["attention_mask"].sum())
        return loss_sum, n_tok

    def _token_loss(self, batch: dict) -> torch.Tensor:
        """Per-token cross-entropy on response positions (B, T-1), zero elsewhere."""
        labels = batch.pop("labels")
        logits = self.model(**batch).logits[:, :-1].float()                  # (B, T-1, V)
        target = labels[:, 1:]
        return torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=-100, reduction="none")

    @torch.no_grad()
    def dev_loss(self, dev: list[Encoded]) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for chunk in _chunks(dev, self.cfg.eval_batch_size):
            batch = _to(collate_train(chunk, self.pad_id), self.device)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(self._token_loss(batch).sum())
            count += n
        return total / max(count, 1)

    # ---- prediction ------------------------------------------------------
    @torch.no_grad()
    def predict(self, prompts: list[Encoded], tokenizer, max_new_tokens: int) -> list[str]:
        """Generate each prompt's response (beam search, `num_beams`), in input order."""
        self.model.eval()
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].prompt))
        out: list[str | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="predict", disable=not self.cfg.progress)
        for idx in _chunks(order, self.cfg.eval_batch_size):
            batch = _to(collate_prompts([prompts[i] for i in idx], self.pad_id), self.device)
            gen = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      num_beams=self.cfg.num_beams, eos_token_id=self.eos_id,
                                      pad_token_id=self.pad_id)
            new = gen[:, batch["input_ids"].shape[1]:]
            for i, row in zip(idx, new):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            bar.update(len(idx))
        bar.close()
        return out
