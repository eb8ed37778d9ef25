"""Instruction tuning on Alpaca, evaluated on MT-Bench (task `alpaca_mtbench`; PARADE B.6, B.7, D).

Training data: the paper used the cleaned Alpaca set (`yahma/alpaca-cleaned`, about 51.7k items;
`task.source=hub`). Locally only `alpaca/alpagasus_random_9k.json` exists: a random 9,229-item
subset of the ORIGINAL 52k Alpaca (AlpaGasus' random-9k baseline), not the cleaned set; every
result from it carries a note saying so.

Test set: the 80 MT-Bench questions (`mt_bench/question.jsonl`, two turns each). Turn 2 is asked
with turn 1 and the model's own first answer in the conversation. Scores: a judge's mean score out
of 10 (`papeft.tasks.judge`, the task's `judge` config) and ROUGE-L against GPT-4's reference answers
(`mt_bench/reference_answer/gpt-4.jsonl`, questions 101-130 only).

Our readings (the papers are silent):
* prompt = instruction, plus "\\n\\n" + input when the input is non-empty; response = output;
  the 4 items with an empty output are dropped (nothing to learn), and the note says so;
* dev = `dev_fraction` (2%) of the training items, a `split_seed` shuffle; test = MT-Bench;
* ROUGE-L = rouge_score's rougeL F-measure (no stemming) x 100, averaged over every answer that
  has a reference answer (30 questions x 2 turns); the judge sees the same GPT-4 reference answers;
  the short `reference` fields some questions carry in question.jsonl are not used;
* the task score is the mean judge score over the answers whose score could be read; unreadable
  ones are counted in `judge_missing`, never as 0. With `judge.enabled: false` the score is ROUGE-L.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from . import metrics
from ..config_checks import Check, between
from .judge import Judge, judge_summary, make_judge, validate_judge_config
from .base import (DATA_ROOT_HINT, DataError, Drawn, Evaluation, Example, RawRow, Task, TaskConfig, bad_row, carve,
                   no_rows, paper_only, read_jsonl, read_text, register_task, resolve_task_dir)

ALPACA_DIR, DEFAULT_TRAIN_FILE, ALPACA_HUB = "alpaca", "alpagasus_random_9k.json", "yahma/alpaca-cleaned"
MT_BENCH_DIR, QUESTION_FILE, REFERENCE_FILE = "mt_bench", "question.jsonl", "reference_answer/gpt-4.jsonl"
SUBSET_NOTE = ("Alpaca training data = alpaca/alpagasus_random_9k.json: a random 9,229-item subset of the ORIGINAL "
               "52k Alpaca (AlpaGasus' random-9k set), NOT the cleaned 51k set (yahma/alpaca-cleaned) the paper "
               "used; results are not comparable to the paper's")
_WS = re.compile(r"\s*")


@dataclass
class AlpacaMTBenchConfig(TaskConfig):
    """configs/task/alpaca_mtbench.yaml: the shared task keys plus the training file, dev share and judge."""

    train_file: str = DEFAULT_TRAIN_FILE     # file under data.root/alpaca/ with source=local
    dev_fraction: float = 0.02               # share of the training items held out as dev
    judge: dict | None = None                # the top-level judge config (configs/judge/*.yaml)

    CHECKS: ClassVar[dict[str, Check]] = {
        **TaskConfig.CHECKS, "split_protocol": paper_only("alpaca_mtbench has one split protocol: dev = "
                                                          "dev_fraction of the training items, test = MT-Bench"),
        "train_file": Check("a non-empty file name", lambda v: bool(v.strip())),
        "dev_fraction": between(0, 1, low_open=True, high_open=True)}


@dataclass(frozen=True)
class MTBenchExample(Example):
    """An MT-Bench question: all its user turns and, for ids 101-130, GPT-4's reference answers."""

    question_id: int
    category: str
    turns: tuple[str, ...]
    references: tuple[str, ...]  # one per turn, or () when MT-Bench has none


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The instruction, then a blank line and the input when there is one (our reading)."""
    return f"{instruction.strip()}\n\n{input_text.strip()}" if input_text.strip() else instruction.strip()


def read_json_list(path: Path) -> list[RawRow]:
    """Items of a JSON list file, each with the 1-based line where it starts (for error messages)."""
    expected = "a JSON list of objects, e.g. [{\"instruction\": ..., \"input\": ..., \"output\": ...}, ...]"
    text = read_text(path)
    decoder, rows = json.JSONDecoder(), []
    i = _WS.match(text, 0).end()
    if not text.startswith("[", i):
        raise bad_row(f"{path}: line {text.count(chr(10), 0, i) + 1}", "the file does not start a JSON list", expected)
    i = _WS.match(text, i + 1).end()
    line, counted = 1, 0
    while not text.startswith("]", i):
        line, counted = line + text.count("\n", counted, i), i
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise bad_row(f"{path}: line {exc.lineno}", f"invalid JSON ({exc.msg})", expected) from None
        rows.append(RawRow(f"{path}: line {line}", len(rows), item))
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()
        elif not text.startswith("]", i):
            where = f"{path}: line {text.count(chr(10), 0, i) + 1}"
            raise bad_row(where, "neither ',' nor ']' after an item", expected)
    if not rows:
        raise no_rows(path, expected)
    return rows


def alpaca_example(row: RawRow, split: str) -> Example | None:
    """An Example from one Alpaca item; None for an item with an empty output (dropped)."""
    data = row.data
    expected = "an object with string fields instruction (non-empty), input and output"
    if not isinstance(data, Mapping):
        raise bad_row(row.where, f"a JSON {type(data).__name__}", expected)
    fields = {k: data.get(k, "") if k == "input" else data.get(k) for k in ("instruction", "input", "output")}
    if not all(isinstance(v, str) for v in fields.values()) or not fields["instruction"].strip():
        raise bad_row(row.where, f"fields {sorted(data)} with types "
                                 f"{ {k: type(v).__name__ for k, v in fields.items()} }", expected)
    if not fields["output"].strip():
        return None
    response = fields["output"].strip()
    return Example(f"alpaca/{split}/{row.index}", alpaca_prompt(fields["instruction"], fields["input"]),
                   response, (response,))


def read_mt_bench(folder: Path) -> list[MTBenchExample]:
    """The MT-Bench questions with their GPT-4 reference answers (where MT-Bench has them)."""
    q_path, r_path = folder / QUESTION_FILE, folder / REFERENCE_FILE
    for path in (q_path, r_path):
        if not path.is_file():
            raise DataError(f"{path} is missing; expected the MT-Bench file from lm-sys/FastChat "
                            f"(fastchat/llm_judge/data/mt_bench/) there; {DATA_ROOT_HINT}")
    references: dict[int, tuple[str, ...]] = {}
    for row in read_jsonl(r_path):
        choices = row.data.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        turns = first.get("turns") if isinstance(first, dict) else None
        if not isinstance(row.data.get("question_id"), int) or not _strings(turns):
            raise bad_row(row.where, f"keys {sorted(row.data)}", "{question_id: int, choices: [{turns: [str, ...]}]}")
        references[row.data["question_id"]] = tuple(turns)
    examples, ids = [], set()
    for row in read_jsonl(q_path):
        qid, turns, category = row.data.get("question_id"), row.data.get("turns"), row.data.get("category")
        if not isinstance(qid, int) or not isinstance(category, str) or not _strings(turns) or qid in ids:
            raise bad_row(row.where, f"question_id={qid!r}, category={category!r}, turns={type(turns).__name__}",
                          "a unique int question_id, a str category and a non-empty list of str turns")
        ids.add(qid)
        refs = references.get(qid, ())
        if refs and len(refs) != len(turns):
            raise bad_row(f"{r_path}", f"question {qid} has {len(turns)} turns but {len(refs)} reference answers",
                          "one reference answer per turn")
        examples.append(MTBenchExample(f"mt_bench/question/{row.index}", turns[0], refs[0] if refs else "",
                                       refs[:1], qid, category, tuple(turns), refs))
    stray = sorted(set(references) - ids)
    if stray:
        raise DataError(f"{r_path}: reference answers for question ids {stray} that {q_path} does not have; "
                        f"use the two files from the same FastChat commit")
    return examples


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)



def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure x 100 of one answer against one reference (the E2E metric of metrics.py)."""
    return metrics.rouge_l([prediction], [[reference]])


def judge_query(turns: Sequence[str], answers: Sequence[str], turn: int) -> str:
    """What the judge sees as the query of `turn`: earlier exchanges as context, then the question."""
    if turn == 0:
        return turns[0]
    earlier = "\n".join(f"User: {q}\nAssistant: {a}" for q, a in zip(turns[:turn], answers[:turn]))
    return (f"(Earlier in this conversation)\n{earlier}\n\n(The user's follow-up question; judge the response "
            f"to this one)\n{turns[turn]}")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class InstructionTask(Task):
    """Alpaca training, MT-Bench test; `judge` may be set directly (tests) instead of from the config."""

    name = "alpaca_mtbench"
    metric = "judge_score"
    config_cls = AlpacaMTBenchConfig
    cap_how, full_test_set = "", "all of MT-Bench"

    def __init__(self) -> None:
        self.judge_cfg: dict | None = None
        self.judge: Judge | None = None

    def draw(self, config: AlpacaMTBenchConfig, data_root: str | None) -> Drawn:
        """dev = `dev_fraction` of the Alpaca items (a split_seed shuffle), train = the rest, test = MT-Bench."""
        self.judge_cfg = config.judge
        validate_judge_config(self.judge_cfg)
        self.metric = "judge_score" if self.judge_cfg.get("enabled", True) else "rouge_l"

        rows, notes = self._alpaca_rows(config, data_root)
        items = [alpaca_example(row, "train") for row in rows]
        examples = [e for e in items if e is not None]
        if len(examples) < len(items):
            notes.append(f"{len(items) - len(examples)} Alpaca items with an empty output dropped")
        seed, dev_fraction = config.split_seed, config.dev_fraction
        dev, train = carve(examples, max(1, round(len(examples) * dev_fraction)), seed)
        test = read_mt_bench(resolve_task_dir(data_root, MT_BENCH_DIR))
        notes.append(f"dev = {len(dev)} Alpaca items ({dev_fraction:.0%}, split_seed={seed}); "
                     f"test = the {len(test)} MT-Bench questions, 2 turns each")
        notes.append(judge_summary(self.judge_cfg))
        alpaca = (ALPACA_HUB if config.source == "hub"
                  else resolve_task_dir(data_root, ALPACA_DIR) / config.train_file)
        return Drawn(train, dev, test, notes, [alpaca, resolve_task_dir(data_root, MT_BENCH_DIR) / QUESTION_FILE])

    def _alpaca_rows(self, config: AlpacaMTBenchConfig, data_root: str | None) -> tuple[list[RawRow], list[str]]:
        if config.source == "hub":
            import datasets

            try:
                loaded = datasets.load_dataset(ALPACA_HUB)
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"could not load {ALPACA_HUB} from the Hugging Face Hub ({type(exc).__name__}: "
                                f"{exc}); check network access or the HF cache, or use task.source=local") from None
            rows = [RawRow(f"hub dataset {ALPACA_HUB}, split train: row {i + 1}", i, dict(d))
                    for i, d in enumerate(loaded["train"])]
            return rows, [f"Alpaca training data = {ALPACA_HUB} from the Hugging Face Hub (the paper's cleaned set)"]
        name = config.train_file
        path = resolve_task_dir(data_root, ALPACA_DIR) / name
        if not path.is_file():
            raise DataError(f"{path} is missing; put an Alpaca JSON list there (task.train_file names it) "
                            f"or use task.source=hub ({ALPACA_HUB}); {DATA_ROOT_HINT}")
        if name == DEFAULT_TRAIN_FILE:
            note = SUBSET_NOTE
        else:
            note = (f"Alpaca training data = alpaca/{name} (a local file; the paper used the cleaned set "
                    f"{ALPACA_HUB}: say whether this is it)")
        return read_json_list(path), [note]

    # ------------------------------------------------------------------ scoring

    def score(self, predictions: list[str], examples: list[Example]) -> float:
        """Mean ROUGE-L (x 100) of single responses against each example's response (the judge needs
        `evaluate`); examples without a reference are skipped."""
        pairs = [(p, e.response) for p, e in zip(predictions, examples) if e.response]
        return _mean([rouge_l(p, r) for p, r in pairs])

    def evaluate(self, generate: Callable[[list], list[str]], examples: list[Example]) -> Evaluation:
        """Answer every turn (later turns see the earlier answers), then ROUGE-L and the judge."""
        bench = [e for e in examples if isinstance(e, MTBenchExample)]
        if len(bench) != len(examples):
            raise TypeError("alpaca_mtbench evaluates MT-Bench questions; load them with InstructionTask.load")
        answers: list[list[str]] = [[] for _ in bench]
        for turn in range(max((len(e.turns) for e in bench), default=0)):
            todo = [i for i, e in enumerate(bench) if len(e.turns) > turn]
            prompts = [_chat(bench[i].turns[:turn + 1], answers[i]) for i in todo]
            for i, reply in zip(todo, generate(prompts)):
                answers[i].append(reply)

        rouge = [[rouge_l(a, e.references[t]) if e.references else None for t, a in enumerate(ans)]
                 for e, ans in zip(bench, answers)]
        judge = self.judge if self.judge is not None else make_judge(self.judge_cfg)
        slots = [(i, t) for i, ans in enumerate(answers) for t in range(len(ans))]
        reviews = judge.review_many([(judge_query(bench[i].turns, answers[i], t), answers[i][t],
                                      bench[i].references[t] if bench[i].references else None)
                                     for i, t in slots]) if judge is not None else []
        by_slot = dict(zip(slots, reviews))

        rows, scores = [], {}
        for i, (e, ans) in enumerate(zip(bench, answers)):
            got = [by_slot.get((i, t)) for t in range(len(ans))]
            rows.append({"uid": e.uid, "question_id": e.question_id, "category": e.category, "turns": list(e.turns),
                         "prediction": ans, "answers": list(e.references), "rouge_l": rouge[i],
                         "judge_score": [r.score if r else None for r in got],
                         "judge_review": [r.text if r else None for r in got],
                         "judge_error": [r.error if r else None for r in got]})
            for t, r in enumerate(got):
                if r is not None and r.score is not None:
                    scores.setdefault(t, []).append(r.score)
        metrics = {"rouge_l": _mean([v for row in rouge for v in row if v is not None])}
        if judge is not None:
            parsed = [s for turn_scores in scores.values() for s in turn_scores]
            metrics.update({"n_judged": float(len(parsed)), "judge_missing": float(len(reviews) - len(parsed)),
                            "judge_call_errors": float(sum(r.error is not None for r in reviews))})
            metrics.update({f"judge_score_turn{t + 1}": _mean(s) for t, s in sorted(scores.items())})
            return Evaluation(_mean(parsed), metrics, rows)
        return Evaluation(metrics["rouge_l"], metrics, rows)


def _chat(turns: Sequence[str], answers: Sequence[str]) -> str | list[dict]:
    """Turn 1 as a plain user prompt; later turns as a chat holding the earlier answers."""
    if len(turns) == 1:
        return turns[0]
    chat: list[dict] = []
    for question, answer in zip(turns, answers):
        chat += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return chat + [{"role": "user", "content": turns[-1]}]


ALPACA_MTBENCH = register_task(InstructionTask())
