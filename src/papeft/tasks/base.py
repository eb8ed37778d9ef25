"""Core of the task registry: examples, splits, the typed task config, the loading template, the
registry, file readers, split and metric helpers.

Every task loads the same way (`Task.load`): its config is checked (`TaskConfig`, unknown keys are
errors), the family draws train/dev/test (`Task.draw`: how to read rows, how to build an Example,
which split protocol), then `max_*_samples` cap each split and the notes say so. `prompt_task.PromptTask`
is the family of the tasks read from official files or the Hub and filled into a prompt template.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf

from papeft.config_checks import Check, ConfigError, at_least, make_config, one_of

from .metrics import accuracy   # label accuracy, the score of every classification task

T = TypeVar("T")

DATA_ROOT_HINT = "set data.root=/path/to/data or the env var PAPEFT_DATA (e.g. PAPEFT_DATA=../shared/data)"
SPLIT_PROTOCOLS = ("paper", "dev_only")  # paper: PARADE Appendix B | dev_only: carved from the validation file
SOURCES = ("local", "hub")               # official files under the data root | Hugging Face datasets
DEFAULT_SPLIT_SEED = 1234


class DataError(RuntimeError):
    """The data a task needs is missing or malformed; the message says where and what to do."""


@dataclass(frozen=True)
class Example:
    """One prompt/response pair, ready for a chat template."""

    uid: str  # stable id: "{task}/{official split}/{0-based row index}", e.g. "copa/val/17"
    prompt: str  # the task's prompt template filled in, before any chat template
    response: str  # gold response text, e.g. "1", "yes", "entailment", "positive"
    answers: tuple[str, ...]  # every acceptable gold answer for scoring


@dataclass
class Splits:
    """The train/dev/test examples of one task, plus notes every result table must carry."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: list[str] = field(default_factory=list)


@dataclass
class TaskConfig:
    """The keys of a configs/task/*.yaml every task reads; a task with more keys subclasses it
    (`Task.config_cls`). Unknown keys, wrong types and values outside `CHECKS` are errors naming the key."""

    name: str
    split_protocol: str = "paper"            # paper | dev_only (which a task supports: its CHECKS say)
    split_seed: int = DEFAULT_SPLIT_SEED     # seed of every split shuffle; never the run seed
    source: str = "local"                    # local: official files under the data root | hub
    max_train_samples: int | None = None     # cap train after splitting; null = all
    max_eval_samples: int | None = None      # cap dev and test each; null = all
    max_dev_samples: int | None = None       # cap dev alone (wins over max_eval_samples); null = max_eval_samples
    max_test_samples: int | None = None      # cap test alone (wins over max_eval_samples); null = max_eval_samples
    max_new_tokens: int = 16                 # generation budget of a response

    CHECKS: ClassVar[dict[str, Check]] = {
        "name": Check("a non-empty string", lambda v: bool(v.strip())), "split_protocol": one_of(*SPLIT_PROTOCOLS),
        "source": one_of(*SOURCES), "max_train_samples": at_least(1), "max_eval_samples": at_least(1),
        "max_dev_samples": at_least(1), "max_test_samples": at_least(1), "max_new_tokens": at_least(1)}


def paper_only(why: str) -> Check:
    """The split_protocol check of a task with one protocol; `why` says what its splits are."""
    return Check(f"'paper' ({why})", lambda v: v == "paper")


class Drawn(NamedTuple):
    """A task's train/dev/test before the caps, the notes on how they were drawn, and the files (or
    hub ids) they came from, for the error when a split ends up empty."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: list[str]
    sources: list[Any]


class Task:
    """Base class of a task: a name, a metric, a typed config, a loader and a scorer.

    A family implements `draw` (read the rows, build the Examples, apply its split protocol);
    `load` is the one template around it: config checked, caps applied, notes written."""

    name: str = ""
    metric: str = "accuracy"
    config_cls: type = TaskConfig
    # the wording of the cap notes, as each family's results have always said it
    cap_how = " (first {limit} of a split_seed shuffle)"  # how a capped split is chosen ("" to leave it unsaid)
    test_unit = ""                                          # what the test set counts, e.g. " MRs"
    full_test_set = "the full test set"                     # what a capped test set is not

    def parse_config(self, values: Mapping[str, Any]) -> TaskConfig:
        """The task config (configs/task/*.yaml as a mapping; `name` defaults to the task's), every key
        type- and range-checked; an error names the task, the key, the value and what is allowed."""
        try:
            return make_config(self.config_cls, {"name": self.name, **plain_mapping(values)}, where="task")
        except ConfigError as exc:
            raise ConfigError(f"task {self.name}: {exc}") from None

    def load(self, cfg: Any, data_root: str | None) -> Splits:
        """Train/dev/test described by the task config `cfg` (a `config_cls`, or a mapping `parse_config`
        checks): drawn by the family, then each capped to `max_*_samples` (the first N of a split_seed
        shuffle), with notes saying so; a split left empty is a DataError naming the sources."""
        config = cfg if isinstance(cfg, self.config_cls) else self.parse_config(cfg)
        drawn = self.draw(config, data_root)
        seed, max_train, max_eval = config.split_seed, config.max_train_samples, config.max_eval_samples
        max_dev, max_test = (own if own is not None else max_eval
                             for own in (config.max_dev_samples, config.max_test_samples))
        notes = list(drawn.notes)
        if max_train is not None and max_train < len(drawn.train):
            notes.append(f"max_train_samples={max_train}: train capped from {len(drawn.train)} examples"
                         + self.cap_how.format(limit=max_train))
        if (max_dev, max_test) == (max_eval, max_eval):       # one key caps both: one note, as it always read
            if max_eval is not None and max_eval < max(len(drawn.dev), len(drawn.test)):
                notes.append(f"max_eval_samples={max_eval}: dev ({len(drawn.dev)}) and test ({len(drawn.test)}"
                             f"{self.test_unit}) each capped{self.cap_how.format(limit=max_eval)}; "
                             f"test is not {self.full_test_set}")
        else:
            for split, limit, size in (("dev", max_dev, len(drawn.dev)), ("test", max_test, len(drawn.test))):
                if limit is not None and limit < size:
                    unit = self.test_unit if split == "test" else ""
                    notes.append(f"{split} capped to {limit} of {size}{unit}{self.cap_how.format(limit=limit)}"
                                 + (f"; test is not {self.full_test_set}" if split == "test" else ""))
        splits = Splits(cap(drawn.train, max_train, seed), cap(drawn.dev, max_dev, seed),
                        cap(drawn.test, max_test, seed), notes)
        return require_examples(splits, self.name, drawn.sources)

    def draw(self, config: TaskConfig, data_root: str | None) -> Drawn:
        """The uncapped train/dev/test of the checked `config` (each family says how)."""
        raise NotImplementedError

    def score(self, predictions: list[str], examples: list[Example]) -> float:
        """Accuracy in percent (0..100) of `predictions` against `examples`."""
        return accuracy(predictions, examples)

    def extra_metrics(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Secondary metrics reported beside the main one (e.g. EM and F1 apart, BLEU)."""
        return {}

    def majority_class(self, train: list[Example], test: list[Example]) -> dict | None:
        """The floor of a task with a closed label set: the training split's most frequent response
        (ties: the first in sorted order) answered for every test example, scored like a method.
        None for tasks with open-ended responses."""
        return None

    def evaluate(self, generate: Callable[[list], list[str]], examples: list[Example]) -> "Evaluation":
        """Generate a response per example and score it. `generate` takes prompts (a string, or a
        chat as a list of {"role", "content"} messages) and returns one response each. Tasks that
        need more (several turns, a judge) override this."""
        preds = generate([e.prompt for e in examples])
        rows = [{"uid": e.uid, "prediction": p, "answers": list(e.answers)} for e, p in zip(examples, preds)]
        return Evaluation(self.score(preds, examples), self.extra_metrics(preds, examples), rows)


@dataclass
class Evaluation:
    """What a task's evaluation returns: the main score, secondary metrics, one row per example."""

    score: float
    metrics: dict[str, float]
    rows: list[dict]


# ---------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` to `TASKS` under `task.name`; a different task under a taken name is an error."""
    if not task.name:
        raise ValueError("a task needs a non-empty name to be registered")
    if TASKS.get(task.name, task) is not task:
        raise ValueError(f"task name {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """Look up a registered task by name; an unknown name lists the known ones."""
    key = str(name).strip().lower()
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[key]


def plain_mapping(values: Any) -> dict:
    """A task config as a plain dict: an OmegaConf node resolved to containers, a config dataclass as
    its fields, a mapping copied."""
    if isinstance(values, DictConfig):
        return OmegaConf.to_container(values, resolve=True)
    return dataclasses.asdict(values) if dataclasses.is_dataclass(values) else dict(values)


# ---------------------------------------------------------------------------- readers


class RawRow(NamedTuple):
    """One row of an official file, with where it came from (for error messages)."""

    where: str  # e.g. "/data/copa/val.jsonl: line 3"
    index: int  # 0-based position among the file's rows (used in uids)
    data: Mapping[str, Any]


def resolve_task_dir(data_root: str | os.PathLike | None, task_dir: str) -> Path:
    """`{data_root}/{task_dir}`, or a DataError saying which directory is missing and how to fix it."""
    if data_root is None or str(data_root).strip() == "":
        raise DataError(f"no data root given, so the directory <data_root>/{task_dir}/ cannot be found; "
                        f"{DATA_ROOT_HINT}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} (absolute: {root.resolve()}) is not a directory; "
                        f"{DATA_ROOT_HINT}")
    path = root / task_dir
    if not path.is_dir():
        raise DataError(f"task directory {path} does not exist under data root {root}; "
                        f"put the official files there or {DATA_ROOT_HINT}")
    return path


def bad_row(where: str, problem: str, expected: str) -> DataError:
    """A DataError for one malformed row: where it is, what is wrong, what was expected, what to do."""
    return DataError(f"{where}: {problem}; expected {expected}. "
                     f"Fix or remove this row, or replace the file with the official one (see MANIFEST.md).")


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (a BOM is dropped); bytes that are not text (invalid UTF-8,
    NUL) raise a DataError naming the file and line, as for any other bad row."""
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start:exc.start + 8]
                raise bad_row(f"{path}: line {line_no}", f"bytes that are not UTF-8 text ({bad!r} at byte "
                              f"{exc.start + 1} of the line)", "a UTF-8 text file") from None
            if "\x00" in line:
                raise bad_row(f"{path}: line {line_no}", "a NUL byte (binary data)", "a UTF-8 text file")
            yield line


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (for JSON documents); bytes that are not text name their line."""
    return "".join(text_lines(path))


def no_rows(path: Path, expected: str) -> DataError:
    return DataError(f"{path}: no rows (the file is empty or holds only a header or blank lines); expected "
                     f"{expected}. Replace it with the official file (see MANIFEST.md).")


def read_jsonl(path: Path) -> list[RawRow]:
    """Rows of a JSON-lines file; blank lines are skipped, anything else must be one JSON object."""
    rows: list[RawRow] = []
    for line_no, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad_row(f"{path}: line {line_no}", f"invalid JSON ({exc.msg})",
                          "one JSON object per line") from None
        if not isinstance(data, dict):
            raise bad_row(f"{path}: line {line_no}", f"a JSON {type(data).__name__}",
                          "one JSON object per line")
        rows.append(RawRow(f"{path}: line {line_no}", len(rows), data))
    if not rows:
        raise no_rows(path, "one JSON object per line")
    return rows


def read_tsv(path: Path, columns: Sequence[str]) -> list[RawRow]:
    """Rows of a GLUE-style TSV with a header line; read with QUOTE_NONE, since `"` is data there."""
    rows: list[RawRow] = []
    reader = csv.reader(text_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(reader, None)
        if header is None or not set(columns) <= set(header):
            raise bad_row(f"{path}: line 1", f"header {header!r}",
                          f"a tab-separated header with columns {list(columns)}")
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise bad_row(f"{path}: line {reader.line_num}", f"{len(cells)} tab-separated cells",
                              f"{len(header)} cells matching the header {header}")
            rows.append(RawRow(f"{path}: line {reader.line_num}", len(rows), dict(zip(header, cells))))
    except csv.Error as exc:
        raise bad_row(f"{path}: line {reader.line_num}", f"unreadable ({exc})", "tab-separated text") from None
    if not rows:
        raise no_rows(path, f"a header with columns {list(columns)}, then one row per example")
    return rows


def require_examples(splits: Splits, task: str, sources: Sequence[Any]) -> Splits:
    """`splits` when every split holds examples; else a DataError naming the split and the files
    it came from, so a run stops at load time instead of after training."""
    empty = [name for name in ("train", "dev", "test") if not getattr(splits, name)]
    if empty:
        raise DataError(f"task {task}: the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} would hold no "
                        f"examples ({len(splits.train)} train / {len(splits.dev)} dev / {len(splits.test)} test) from "
                        f"{', '.join(map(str, sources))}; the file is too small for the split protocol (or the caps): "
                        f"use the full official file or task.split_protocol / task.max_*_samples that leave examples")
    return splits


# ---------------------------------------------------------------------------- split protocol


def shuffled(items: Sequence[T], seed: int) -> list[T]:
    """A copy of `items` in a fixed pseudo-random order that depends only on `seed`."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)  # a private generator: global/run seeds never matter
    return [items[i] for i in order]


def halve(items: Sequence[T], seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with `seed` and cut in two; the first half gets `len // 2` items, the second the rest."""
    mixed = shuffled(items, seed)
    cut = len(mixed) // 2
    return mixed[:cut], mixed[cut:]


def carve(items: Sequence[T], n_first: int, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with `seed`; return (the first `n_first` items, the rest)."""
    if not 0 <= n_first <= len(items):
        raise DataError(f"cannot carve {n_first} examples out of {len(items)}")
    mixed = shuffled(items, seed)
    return mixed[:n_first], mixed[n_first:]


def dev_only_split(validation: Sequence[T], seed: int) -> tuple[list[T], list[T], list[T]]:
    """The dev_only rule, shared by all tasks: official validation file -> halves (as `halve`);
    the second half is the test set; the first half is cut 80/20 into train/dev.

    Returns (train, dev, test).
    """
    first, test = halve(validation, seed)
    n_train = len(first) * 4 // 5
    return first[:n_train], first[n_train:], test


def cap(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """The first `limit` items of a `seed` shuffle of `items` (all of them, in order, if no limit)."""
    if limit is None or limit >= len(items):
        return list(items)
    return shuffled(items, seed)[:limit]
