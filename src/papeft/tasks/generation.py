"""`FreeTextTask`, the loader of the tasks whose response is free text, and the generation tasks
E2E (ROUGE-L) and GSM8K (final-answer accuracy). Templates: PARADE, Appendix C.

A `FreeTextTask` is a `PromptTask` (same split protocol, caps, hub fallback, error messages)
whose rows carry gold texts instead of a label. Each task says how to read its official file
into records, and how to flatten one record (a file's or a hub row's) into rows holding the
template's fields plus `answers` (the gold texts; the first is the training response unless a
`response` is given). `qa.py` builds SQuAD and ReCoRD from the same class.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from ..config_checks import Check
from .base import (DATA_ROOT_HINT, DataError, Drawn, Example, RawRow, TaskConfig, bad_row, no_rows, paper_only,
                   read_jsonl, register_task, resolve_task_dir, text_lines)
from .metrics import GSM8K_MARKER, corpus_bleu, final_number_accuracy, gold_final_number, rouge_l
from .prompt_task import PromptTask

Record = tuple[str, Mapping[str, Any]]  # (where it came from, for error messages; the record)
Scorer = Callable[[Sequence[str], Sequence[Example]], dict[str, float]]


def text_field(record: Mapping[str, Any], key: str, where: str, expected: str) -> str:
    """`record[key]` if it is a non-blank string, else a DataError naming `where`."""
    value = record.get(key) if isinstance(record, Mapping) else None
    if not isinstance(value, str) or not value.strip():
        raise bad_row(where, f"field {key!r} is {value!r}", expected)
    return value


def list_field(record: Mapping[str, Any], key: str, where: str, expected: str) -> list:
    """`record[key]` if it is a non-empty list, else a DataError naming `where`."""
    value = record.get(key) if isinstance(record, Mapping) else None
    if not isinstance(value, list) or not value:
        raise bad_row(where, f"field {key!r} is {value!r}", expected)
    return value


def read_csv_records(path: Path, columns: Sequence[str]) -> list[Record]:
    """Records of a CSV file (standard quoting: quoted fields may hold commas) with this header."""
    records: list[Record] = []
    reader = csv.reader(text_lines(path))
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != list(columns):
            raise bad_row(f"{path}: line 1", f"header {header!r}", f"the CSV header {','.join(columns)}")
        start = reader.line_num + 1
        for cells in reader:
            where, start = f"{path}: line {start}", reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(columns):
                raise bad_row(where, f"{len(cells)} comma-separated cells",
                              f"{len(columns)} cells {list(columns)}")
            records.append((where, dict(zip(columns, cells))))
    except csv.Error as exc:
        raise bad_row(f"{path}: line {reader.line_num}", f"unreadable ({exc})", "comma-separated text") from None
    if not records:
        raise no_rows(path, f"the CSV header {','.join(columns)}, then one row per example")
    return records


def unique(texts: Sequence[str]) -> tuple[str, ...]:
    """`texts` without repeats, in first-seen order."""
    return tuple(dict.fromkeys(texts))


class FreeTextTask(PromptTask):
    """A prompt -> free-text task; `scorer` returns every metric, `metric` names the main one."""

    def __init__(self, name: str, *, task_dir: str, files: Mapping[str, str], template: str, metric: str,
                 scorer: Scorer, dev_from_train: int | None = None,
                 hub_ids: Sequence[tuple[str, str | None]] = (), hub_splits: Mapping[str, str] | None = None):
        super().__init__(name, train_file=files["train"], val_file=files["validation"], template=template,
                         label_words={}, dev_from_train=dev_from_train, hub_ids=hub_ids)
        self.task_dir = task_dir  # files live in {data_root}/{task_dir}/
        self.files = dict(files)  # role (train, validation[, test]) -> official file name
        self.metric = metric
        self.scorer = scorer
        self.hub_splits = {**{role: role for role in self.files}, **(hub_splits or {})}  # role -> hub split

    # ------------------------------------------------------------------ per-task hooks

    def read_records(self, path: Path) -> list[Record]:
        """The records of one official file (default: JSON lines)."""
        return [(row.where, row.data) for row in read_jsonl(path)]

    def flatten(self, record: Mapping[str, Any], where: str) -> list[Record]:
        """Rows (template fields + `answers`) of one record of the official file."""
        return [(where, record)]

    def from_hub(self, record: Mapping[str, Any], where: str) -> list[Record]:
        """Rows of one Hugging Face Hub row (default: as a file record)."""
        return self.flatten(record, where)

    # ------------------------------------------------------------------ rows -> examples

    def to_example(self, row: RawRow, split: str) -> Example:
        """Fill the template from one flattened row; a malformed row raises DataError naming it."""
        expected = f"text fields {list(self.fields)} and at least one non-blank gold answer"
        values = {f: text_field(row.data, f, row.where, expected).strip() for f in self.fields}
        answers = row.data.get("answers")
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise bad_row(row.where, f"gold answers {answers!r}", expected)
        answers = tuple(a.strip() for a in answers)
        response = str(row.data.get("response") or answers[0]).strip()
        return Example(f"{self.name}/{split}/{row.index}", self.template.format(**values), response, answers)

    def _examples(self, records: list[Record], flatten: Callable, stem: str) -> list[Example]:
        rows = [pair for where, record in records for pair in flatten(record, where)]
        return [self.to_example(RawRow(where, i, data), stem) for i, (where, data) in enumerate(rows)]

    def official_file(self, data_root: str | None, role: str) -> Path:
        """Path of the official file of `role`; a DataError naming it (and the hub) if it is missing."""
        hub = " or ".join(f"{p}/{c}" if c else p for p, c in self.hub_ids)
        fallback = f"or load the task from the Hugging Face Hub with task.source=hub ({hub})"
        try:
            path = resolve_task_dir(data_root, self.task_dir) / self.files[role]
        except DataError as exc:
            raise DataError(f"{exc}; {fallback}") from None
        if not path.is_file():
            raise DataError(f"{path} is missing; expected the official {self.name} {role} file there "
                            f"(see MANIFEST.md); {DATA_ROOT_HINT}, {fallback}")
        return path

    def read_local(self, data_root: str | None, role: str) -> list[Example]:
        path = self.official_file(data_root, role)
        return self._examples(self.read_records(path), self.flatten, path.stem)

    # ------------------------------------------------------------------ hub

    def load_hub(self) -> tuple[Any, str]:
        """(the first of `hub_ids` that loads, its description); DataError listing every failure."""
        import datasets

        failures = []
        for path, config in self.hub_ids:
            try:
                return datasets.load_dataset(path, config), f"hub dataset {path}/{config}"
            except Exception as exc:  # no network, renamed dataset, ...: try the next id
                failures.append(f"{path}/{config}: {type(exc).__name__}: {exc}")
        raise DataError(f"could not load {self.name} from the Hugging Face Hub "
                        f"(tried {'; '.join(failures)}). Check network access or the HF cache, "
                        f"or use task.source=local and {DATA_ROOT_HINT}")

    def read_hub(self, need_train: bool) -> tuple[list[Example] | None, list[Example]]:
        loaded, source = self.load_hub()
        train = self._hub_split(loaded, source, "train") if need_train else None
        return train, self._hub_split(loaded, source, "validation")

    def _hub_split(self, loaded: Any, source: str, role: str) -> list[Example]:
        split = self.hub_splits[role]
        if split not in loaded:
            raise DataError(f"{source} has no {split!r} split (it has {list(loaded)}); "
                            f"use task.source=local or another dataset id")
        records = [(f"{source}, split {split}: row {i + 1}", dict(data)) for i, data in enumerate(loaded[split])]
        return self._examples(records, self.from_hub, Path(self.files[role]).stem)

    # ------------------------------------------------------------------ scoring

    def score(self, predictions: list[str], examples: list[Example]) -> float:
        return self.scorer(predictions, examples)[self.metric]

    def extra_metrics(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        return {k: v for k, v in self.scorer(predictions, examples).items() if k != self.metric}

    def _dev_only_note(self, seed: int, train: list, dev: list, test: list) -> str:
        val_file = self.files["validation"]
        note = super()._dev_only_note(seed, train, dev, test)
        return note.replace(f"{self.name}/{val_file}", f"{self.task_dir}/{val_file}")


# ---------------------------------------------------------------------------- E2E


def e2e_scores(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """ROUGE-L (main) and corpus BLEU, each against all references of an MR."""
    references = [ex.answers for ex in examples]
    return {"rouge_l": rouge_l(predictions, references), "bleu": corpus_bleu(predictions, references)}


def group_references(examples: Sequence[Example]) -> list[Example]:
    """One example per unique prompt (E2E: per MR), in first-seen order, keeping the first row's uid
    and response; its answers are all references of that prompt (repeats dropped)."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.prompt, []).append(ex)
    return [Example(rows[0].uid, rows[0].prompt, rows[0].response, unique([a for r in rows for a in r.answers]))
            for rows in groups.values()]


@dataclass
class E2EConfig(TaskConfig):
    """configs/task/e2e.yaml: the shared task keys; the official files fix the splits, so only `paper`."""

    CHECKS: ClassVar[dict[str, Check]] = {**TaskConfig.CHECKS, "split_protocol": paper_only(
        "e2e has official train/dev/test files, so only task.split_protocol=paper applies")}


class E2ETask(FreeTextTask):
    """E2E NLG under its official splits: train and dev are (MR, reference) rows; the test set is one
    example per unique MR whose answers are all its references (4,693 rows -> 630 MRs).

    Our reading: dev stays one example per row (4,672, the paper's count): it only gives the dev loss."""

    COLUMNS = ("mr", "ref")
    config_cls = E2EConfig
    test_unit = " MRs"

    def read_records(self, path: Path) -> list[Record]:
        return read_csv_records(path, self.COLUMNS)

    def flatten(self, record: Mapping[str, Any], where: str) -> list[Record]:
        expected = "a meaning representation (mr) and a reference text (ref)"
        mr, ref = (text_field(record, key, where, expected) for key in self.COLUMNS)
        return [(where, {"mr": mr, "answers": [ref]})]

    def from_hub(self, record: Mapping[str, Any], where: str) -> list[Record]:
        """e2e_nlg rows: meaning_representation, human_reference; GEM/e2e_nlg: target (+ references)."""
        expected = "meaning_representation and human_reference (or target)"
        mr = text_field(record, "meaning_representation", where, expected)
        refs = record.get("references") or [record.get("human_reference") or record.get("target")]
        return [(where, {"mr": mr, "answers": refs})]

    def draw(self, config: TaskConfig, data_root: str | None) -> Drawn:
        """The official train/dev/test files (or hub splits); the test set grouped by MR."""
        roles = ("train", "validation", "test")
        if config.source == "hub":
            loaded, where = self.load_hub()
            train, dev, test = (self._hub_split(loaded, where, role) for role in roles)
            sources = [where]
        else:
            train, dev, test = (self.read_local(data_root, role) for role in roles)
            sources = [self.official_file(data_root, role) for role in roles]
        return Drawn(train, dev, group_references(test), [], sources)


E2E = register_task(E2ETask(
    "e2e", task_dir="e2e_nlg",
    files={"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"},
    template="Reference:\n{mr}\nGenerate a customer review following the given reference.",
    metric="rouge_l", scorer=e2e_scores,
    hub_ids=[("tuetschek/e2e_nlg", None), ("e2e_nlg", None), ("GEM/e2e_nlg", None)]))


# ---------------------------------------------------------------------------- GSM8K


def gsm8k_scores(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Final-number accuracy; answers[0] holds the gold number's text (e.g. "1,450,000")."""
    return {"accuracy": final_number_accuracy(predictions, [ex.answers[0] for ex in examples])}


class GSM8KTask(FreeTextTask):
    """GSM8K: the response is the whole official solution (calculator annotations `<<..>>` and the
    final `#### N` line kept: our reading, the paper's [target] verbatim); the answer is N."""

    def flatten(self, record: Mapping[str, Any], where: str) -> list[Record]:
        expected = "a question and an answer (solution) ending '#### <number>'"
        question = text_field(record, "question", where, expected)
        solution = text_field(record, "answer", where, expected)
        if gold_final_number(solution) is None:
            raise bad_row(where, f"no final number after '{GSM8K_MARKER}' in answer ending "
                                 f"{json.dumps(solution[-60:])}", expected)
        final = solution.rsplit(GSM8K_MARKER, 1)[1].strip()
        return [(where, {"question": question, "response": solution, "answers": [final]})]


GSM8K_DEV_FROM_TRAIN = 500

GSM8K = register_task(GSM8KTask(
    "gsm8k", task_dir="gsm8k", files={"train": "train.jsonl", "validation": "test.jsonl"},
    # the paper's text, its typo "quesition" included (our reading: faithful)
    template="Answer the following math quesition:\n{question}\nInstruction: please think step by step.",
    metric="accuracy", scorer=gsm8k_scores, dev_from_train=GSM8K_DEV_FROM_TRAIN,
    hub_ids=[("openai/gsm8k", "main"), ("gsm8k", "main")], hub_splits={"validation": "test"}))
