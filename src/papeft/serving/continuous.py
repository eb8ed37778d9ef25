"""Iteration-level batching (Orca's scheduling): requests join the running batch at a decode-step
boundary and leave when they finish, without stopping the others.

    batcher = ContinuousBatcher(engine, max_rows=32, max_waiting=256)
    job = batcher.submit(Job(Request(ids, "acme"), max_new_tokens=32))   # QueueFull past max_waiting
    batcher.start()                      # a worker thread runs iterations while there is work
    job.wait(); job.result               # a Result, as MultiTenantEngine.generate gives it

One iteration (`step`):
1. admit waiting jobs first come first served while their rows fit under `max_rows`
   (a job takes `num_beams` rows), at most `max_prefill_rows` prompts at a time;
2. prefill them together through the engine's call hooks (each row its own tenant's
   vectors, scales, LoRA weights, soft prompt); their first tokens come from the prefill;
   their rows (expanded to their beams) join the running batch (running_batch.py);
3. one decode step for every running row; each job chooses its tokens from its own rows'
   logits (decoding.py: greedy or transformers' beam search, batch size 1); finished or
   cancelled jobs leave, beams are reordered, and the batch's shared padding is cut.

A job's tokens are those `MultiTenantEngine.generate` gives for the same request alone,
whatever else runs beside it. Tenants are added and removed between iterations
(`add_tenant` / `remove_tenant`, under the same lock as an iteration): a removed tenant
takes no new jobs at once, its waiting jobs are answered with an error, and its running
jobs finish first (a peft adapter is deleted only when no row uses it).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from papeft.serving.decoding import BeamDecoder, GreedyDecoder
from papeft.serving.engine import MultiTenantEngine, Request, Result
from papeft.serving.running_batch import RunningBatch
from papeft.serving.tenants import TenantError, load_tenant

log = logging.getLogger(__name__)


# generation_config settings that would change what generate() picks (default: no effect); the decoders
# do not apply them, so a backbone that sets one is refused
UNSERVED_GENERATION = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                       "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
                       "forced_eos_token_id": None, "sequence_bias": None, "encoder_repetition_penalty": 1.0,
                       "exponential_decay_length_penalty": None, "min_length": 0, "diversity_penalty": 0.0}


class QueueFull(Exception):
    """The waiting queue holds `max_waiting` jobs: the caller should retry later (HTTP 429)."""


class Stopped(Exception):
    """The batcher has stopped: no job is taken (HTTP 503)."""


@dataclass(eq=False)                                   # a job is itself: never compared field by field (tensors)
class Job:
    request: Request
    max_new_tokens: int = 32
    num_beams: int = 1
    min_new_tokens: int | None = None
    return_scores: bool = False                           # greedy: also the chosen tokens' log-probability sum
    on_tokens: Callable[[list[int]], None] | None = None   # greedy: called (worker thread) with each new token
    on_done: Callable[["Job"], None] | None = None         # called (worker thread) once, when it has a result
    result: Result | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    status: int = 0                                         # 200 answered; else the HTTP status of its error
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def rows(self) -> int:
        return self.num_beams

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class ContinuousBatcher:
    def __init__(self, engine: MultiTenantEngine, max_rows: int = 32, max_waiting: int = 256,
                 max_prefill_rows: int = 8):
        if min(max_rows, max_waiting, max_prefill_rows) < 1:
            raise ValueError(f"max_rows={max_rows}, max_waiting={max_waiting} and max_prefill_rows={max_prefill_rows} "
                             "must be >= 1")
        gen = engine.backbone.generation_config
        changed = {k: getattr(gen, k, None) for k in UNSERVED_GENERATION
                   if getattr(gen, k, None) not in (None, UNSERVED_GENERATION[k], [], {})}
        if changed:
            raise ValueError(f"the backbone's generation_config sets {changed}: the batcher's decoders apply only "
                             "min_new_tokens, so its answers would differ from generate()'s")
        self.length_penalty = gen.length_penalty if gen.length_penalty is not None else 1.0
        self.early_stopping = gen.early_stopping if gen.early_stopping is not None else False
        self.engine, self.max_rows, self.max_waiting, self.max_prefill_rows = engine, max_rows, max_waiting, \
            max_prefill_rows
        self.lock = threading.RLock()                  # the engine: iterations, tenant changes
        self.queue = threading.Condition()             # the waiting jobs; wakes the worker
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []                   # in row order
        self.decoders: dict[int, GreedyDecoder | BeamDecoder] = {}
        self.batch: RunningBatch | None = None
        self.next_tokens: list[int] = []               # each running row's next input token
        self.removing: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.iterations = 0

    # ---- jobs -----------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue a job; raises QueueFull when `max_waiting` jobs wait, ValueError for a job that can never run."""
        if job.num_beams < 1 or job.num_beams > self.max_rows:
            raise ValueError(f"num_beams={job.num_beams}: expected 1..{self.max_rows} (the batch's rows)")
        if job.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={job.max_new_tokens}: expected >= 1")
        if job.request.tenant in self.removing:
            raise ValueError(f"tenant '{job.request.tenant}' is being removed")
        with self.queue:
            if self._stop:
                raise Stopped("the batcher has stopped")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_waiting={self.max_waiting})")
            self.waiting.append(job)
            self.queue.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The caller is gone: a waiting job leaves the queue now, a running one at the next step."""
        job.cancelled = True
        with self.queue:
            if job in self.waiting:
                self.waiting.remove(job)
            else:
                return
        self._finish(job, Result(job.request.tenant, None, "cancelled"), 499)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pending(self) -> int:
        """Jobs waiting or running."""
        return len(self.waiting) + len(self.running)

    def _finish(self, job: Job, result: Result, status: int = 200) -> None:
        """Answer a job (once): `status` says what kind of failure an error is (404 tenant, 400 request,
        499 cancelled, 500 server, 503 stopped)."""
        if job._done.is_set():
            return
        job.result, job.finished_at, job.status = result, time.perf_counter(), status
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:  # noqa: BLE001  (a caller's callback never stops the batch)
                log.exception("on_done callback failed")
        job._done.set()

    def _emit(self, job: Job, tokens: list[int]) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if job.on_tokens is not None and tokens:
            try:
                job.on_tokens(tokens)
            except Exception:  # noqa: BLE001
                log.exception("on_tokens callback failed")

    # ---- one iteration --------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """One iteration (admit + prefill, then one decode step); returns whether work remains."""
        with self.lock:
            newcomers = self._admit()
            try:
                if newcomers:
                    self._join(newcomers)
                if self.running:
                    self._decode()
            except Exception as e:  # noqa: BLE001  (whatever failed, every job in hand is answered and the loop lives)
                log.exception("iteration failed")
                for job in newcomers + self.running:
                    self._finish(job, Result(job.request.tenant, None, f"internal error: {type(e).__name__}: {e}"),
                                 500)
                self.running, self.batch, self.next_tokens, self.decoders = [], None, [], {}
            self._drop_removed_tenants()
            self.iterations += 1
            return bool(self.waiting or self.running)

    def _admit(self) -> list[Job]:
        rows = sum(j.rows for j in self.running)
        taken: list[Job] = []
        with self.queue:
            while self.waiting and len(taken) < self.max_prefill_rows:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    self._finish(job, Result(job.request.tenant, None, "cancelled"), 499)
                    continue
                if rows + job.rows > self.max_rows:
                    break
                taken.append(self.waiting.popleft())
                rows += job.rows
        return taken

    def _decoder(self, job: Job):
        e = self.engine
        if job.num_beams == 1:
            return GreedyDecoder(e.eos, job.max_new_tokens, job.min_new_tokens, job.return_scores)
        return BeamDecoder(e.eos, job.max_new_tokens, job.num_beams, job.min_new_tokens, self.length_penalty,
                           self.early_stopping, fill=e.pad, device=e.device)

    def _join(self, jobs: list[Job]) -> None:
        """Prefill newcomers together; their first tokens; their rows join the running batch."""
        valid, rows = [], []
        for job in jobs:
            tenant, soft, err = self.engine.check(job.request)
            if err is not None or job.request.tenant in self.removing:
                self._finish(job, Result(job.request.tenant, None, err or f"tenant '{job.request.tenant}' removed"),
                             404 if err is None else err.status)
                continue
            valid.append(job)
            rows.append((torch.as_tensor(job.request.input_ids), tenant, soft))
        if not valid:
            return
        try:
            batch, logits = RunningBatch.prefill(self.engine, rows)             # (P, V)
        except Exception as e:  # noqa: BLE001  (a failed prefill fails its jobs, never the running ones)
            log.exception("prefill failed")
            for job in valid:
                self._finish(job, Result(job.request.tenant, None, f"prefill failed: {type(e).__name__}: {e}"), 500)
            return
        keep, tokens = [], []
        for p, job in enumerate(valid):
            decoder = self._decoder(job)
            sources, chosen = decoder.step(logits[p: p + 1].expand(job.rows, -1))
            self._emit(job, decoder.new_tokens())
            if decoder.done or job.cancelled:
                self._complete(job, decoder)
                continue
            keep += [p] * len(sources)
            tokens += chosen
            self.decoders[id(job)] = decoder
            self.running.append(job)
        if keep:
            batch.select(torch.tensor(keep, device=self.engine.device))
            if self.batch is None:
                self.batch = batch
            else:
                self.batch.extend(batch)
            self.next_tokens += tokens

    def _decode(self) -> None:
        """One step for every running row; finished jobs leave, beams are reordered."""
        ids = torch.tensor(self.next_tokens, device=self.engine.device)
        try:
            logits = self.batch.step(self.engine, ids)                          # (B, V)
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed")
            for job in self.running:
                self._finish(job, Result(job.request.tenant, None, f"decode failed: {type(e).__name__}: {e}"), 500)
            self.running, self.batch, self.next_tokens, self.decoders = [], None, [], {}
            return
        keep, tokens, still, offset = [], [], [], 0
        for job in self.running:
            decoder = self.decoders[id(job)]
            before = len(decoder.new_tokens())
            sources, chosen = decoder.step(logits[offset: offset + job.rows])
            self._emit(job, decoder.new_tokens()[before:])
            if decoder.done or job.cancelled:
                self._complete(job, decoder)
            else:
                keep += [offset + s for s in sources]
                tokens += chosen
                still.append(job)
            offset += job.rows
        self.running, self.next_tokens = still, tokens
        if not still:
            self.batch = None
        elif keep != list(range(len(self.batch))):
            self.batch.select(torch.tensor(keep, device=self.engine.device))

    def _complete(self, job: Job, decoder) -> None:
        self.decoders.pop(id(job), None)
        if job.cancelled:
            self._finish(job, Result(job.request.tenant, None, "cancelled"), 499)
            return
        tokens, score = decoder.result()
        self._finish(job, Result(job.request.tenant, self.engine.trim(tokens), score=score))

    # ---- tenants --------------------------------------------------------------
    def add_tenant(self, name: str, directory) -> None:
        """Read an adapter while the batch runs, then place and probe it between iterations (TenantError
        if refused, remembered in `engine.refused`)."""
        e = self.engine
        if name in e.tenants:
            raise TenantError(f"tenant '{name}' is already loaded; remove it first")
        try:
            loaded = load_tenant(name, directory, e.backbone, e.tokenizer)
        except TenantError as err:
            if name not in e.tenants:                          # a served tenant is never listed as refused
                e.refused[name] = str(err)
            raise
        with self.lock:
            if name in self.removing:
                self._drop_removed_tenants()
                if name in self.removing:
                    raise ValueError(f"tenant '{name}' is still being removed: its running requests finish first")
            e.add_tenant(name, directory, loaded)

    def remove_tenant(self, name: str) -> None:
        """New jobs of `name` are refused at once, its waiting ones answered with an error; its running
        ones finish, then its weights go."""
        if name not in self.engine.tenants:
            raise KeyError(f"tenant '{name}' is not loaded")
        with self.lock:
            self.removing.add(name)
            with self.queue:
                gone = [j for j in self.waiting if j.request.tenant == name]
                for job in gone:
                    self.waiting.remove(job)
            for job in gone:
                self._finish(job, Result(name, None, f"tenant '{name}' removed"), 404)
            self._drop_removed_tenants()

    def _drop_removed_tenants(self) -> None:
        """Unload the removed tenants no running row uses. A failed unload is logged and the name stays
        refused (its weights may linger); it never stops the worker."""
        busy = {j.request.tenant for j in self.running}
        for name in sorted(self.removing - busy):
            try:
                if name in self.engine.tenants:
                    self.engine.remove_tenant(name)
            except Exception:  # noqa: BLE001
                log.exception("removing tenant %r failed", name)
                self.engine.tenants.pop(name, None)
                self.engine.refused[name] = "removed (unloading its weights failed; see the server log)"
            self.removing.discard(name)

    # ---- worker thread --------------------------------------------------------
    def run_until_idle(self) -> None:
        while self.step():
            pass

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="papeft-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.queue:
            self._stop = True
            self.queue.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._answer_all("the server stopped", 503)             # nobody is left waiting for an answer

    def _answer_all(self, message: str, status: int) -> None:
        """Answer every waiting and running job with an error and empty the batch."""
        with self.lock:
            with self.queue:
                left, self.waiting = list(self.waiting) + self.running, collections.deque()
            self.running, self.batch, self.next_tokens, self.decoders = [], None, [], {}
            for job in left:
                self._finish(job, Result(job.request.tenant, None, message), status)

    def _loop(self) -> None:
        while True:
            with self.queue:
                while not self._stop and not self.waiting and not self.running:
                    self.queue.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001  (step answers its own failures; this is the last guard)
                log.exception("an iteration failed outside its guard: every running and waiting job answered 500")
                self._answer_all("internal error (see the server log)", 500)
