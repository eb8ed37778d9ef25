"""`PromptTask`: the family of tasks read from official files (or the Hugging Face Hub) and filled
into a prompt template, under the paper's split protocol (PARADE, Appendix B), dev_only or full_test.

A `PromptTask` is parameterised by its official files, a prompt template, a label -> response
map, its Hugging Face Hub ids, and where the paper's dev set comes from: half of the official
validation file (small datasets) or `dev_from_train` rows of the official train file (large ones).
The classification tasks are instances (`superglue.py`: COPA, BoolQ, RTE; `glue.py`: SST-2, QNLI);
`generation.FreeTextTask` subclasses it for free-text responses (E2E, GSM8K, SQuAD, ReCoRD).
"""
from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

from papeft.config_checks import Check, one_of

from .base import (DATA_ROOT_HINT, DataError, Drawn, Example, RawRow, Task, TaskConfig, bad_row, carve,
                   dev_only_split, halve, read_jsonl, read_tsv, resolve_task_dir)
from .metrics import accuracy

# full_test: the test set is the largest labelled held-out set (the official test set where its labels
# are released, else the whole official validation file); dev comes from what is left (README, Results).
PROMPT_SPLIT_PROTOCOLS = ("paper", "dev_only", "full_test")


@dataclass
class PromptTaskConfig(TaskConfig):
    CHECKS: ClassVar[dict[str, Check]] = {**TaskConfig.CHECKS, "split_protocol": one_of(*PROMPT_SPLIT_PROTOCOLS)}


class OfficialTest(NamedTuple):
    """An official test file whose labels were released apart from it: `read_labels(path)` returns the
    raw label of each test row, in file order (COPA: COPA-resources/results/gold.test)."""

    file: str                                  # under the task folder, rows without labels
    labels_file: str                           # under the task folder
    read_labels: Callable[[Path], list[Any]]


def _label_key(raw: Any) -> str:
    """Raw labels of every source (bool, int, str) as one lookup key: True -> "true", 0 -> "0"."""
    return str(raw).strip().lower()


class PromptTask(Task):
    """A classification task cast as prompt -> label word, loaded under the paper's split protocol."""

    config_cls = PromptTaskConfig

    def __init__(self, name: str, *, train_file: str, val_file: str, template: str,
                 label_words: Mapping[Any, str], label_fields: Sequence[str] = ("label",),
                 value_maps: Mapping[str, Mapping[str, str]] | None = None,
                 dev_from_train: int | None = None, hub_ids: Sequence[tuple[str, str | None]] = (),
                 official_test: OfficialTest | None = None):
        self.name = name
        self.task_dir = name  # files live in {data_root}/{name}/
        self.files = {"train": train_file, "validation": val_file}
        self.template = template  # str.format template over the row's fields
        self.fields = tuple(f for _, f, _, _ in string.Formatter().parse(template) if f)
        self.label_words = {_label_key(k): v for k, v in label_words.items()}
        self.label_fields = tuple(label_fields)  # first one present in a row holds the label
        self.value_maps = {k: dict(v) for k, v in (value_maps or {}).items()}  # field value -> text
        self.dev_from_train = dev_from_train  # None: the paper's dev set is half the validation file
        self.hub_ids = tuple(hub_ids)  # (path, config name) pairs for datasets.load_dataset, tried in order
        self.official_test = official_test  # a labelled official test set (split_protocol=full_test reads it)

    @property
    def labels(self) -> tuple[str, ...]:
        """Every response this task can have (scoring prefers the longest matching one)."""
        return tuple(sorted(set(self.label_words.values())))

    def score(self, predictions: list[str], examples: list[Example]) -> float:
        """Accuracy in percent; a prediction matching a longer label of this task never counts."""
        return accuracy(predictions, examples, self.labels)

    def majority_class(self, train: list[Example], test: list[Example]) -> dict | None:
        if not self.label_words or not train:              # free-text subclasses: no label set
            return None
        counts = Counter(e.response for e in train)
        label = min(counts, key=lambda word: (-counts[word], word))
        return {"label": label, "score": self.score([label] * len(test), test)}

    # ------------------------------------------------------------------ rows -> examples

    def to_example(self, row: RawRow, split: str) -> Example:
        """Fill the template from one raw row; a malformed row raises DataError naming the row."""
        expected = f"text fields {list(self.fields)} (non-empty strings) and a label in {list(self.label_fields)}"
        missing = [f for f in self.fields if row.data.get(f) is None]
        label_field = next((f for f in self.label_fields if row.data.get(f) is not None), None)
        if missing or label_field is None:
            raise bad_row(row.where, f"missing {missing or list(self.label_fields)}", expected)
        for f in self.fields:
            value = row.data[f]
            if not isinstance(value, str) or not value.strip():
                shown = f"a JSON {type(value).__name__}" if not isinstance(value, str) else "an empty string"
                raise bad_row(row.where, f"field {f!r} is {shown} ({str(value)[:40]!r})", expected)
        raw_label = row.data[label_field]
        response = self.label_words.get(_label_key(raw_label))
        if response is None:
            raise bad_row(row.where, f"unknown label {raw_label!r}",
                          f"one of {sorted(self.label_words)} in field {label_field!r}")
        values = {f: row.data[f].strip() for f in self.fields}
        for field_name, mapping in self.value_maps.items():
            if values[field_name].lower() not in mapping:
                raise bad_row(row.where, f"field {field_name!r} is {values[field_name]!r}",
                              f"one of {sorted(mapping)}")
            values[field_name] = mapping[values[field_name].lower()]
        prompt = self.template.format(**values)
        return Example(f"{self.name}/{split}/{row.index}", prompt, response, (response,))

    def read_local(self, data_root: str | None, role: str) -> list[Example]:
        """Examples of one official file, `role` "train" or "validation", under `data_root`."""
        path = resolve_task_dir(data_root, self.task_dir) / self.files[role]
        if not path.is_file():
            raise DataError(f"{path} is missing; expected the official {self.name} {role} file there; "
                            f"{DATA_ROOT_HINT}")
        if path.suffix == ".tsv":
            rows = read_tsv(path, self.fields + self.label_fields[:1])
        else:
            rows = read_jsonl(path)
        return [self.to_example(row, path.stem) for row in rows]

    def read_hub(self, need_train: bool) -> tuple[list[Example] | None, list[Example]]:
        """(train or None, validation) examples from the Hugging Face Hub (needs network or cache)."""
        import datasets

        failures = []
        for path, config in self.hub_ids:
            try:
                loaded = datasets.load_dataset(path, config)
            except Exception as exc:  # no network, renamed dataset, ...: try the next id
                failures.append(f"{path}/{config}: {type(exc).__name__}: {exc}")
                continue
            source = f"hub dataset {path}/{config}"
            roles = ("train", "validation") if need_train else ("validation",)
            found = {role: self._hub_split(loaded, source, role) for role in roles}
            return found.get("train"), found["validation"]
        raise DataError(f"could not load {self.name} from the Hugging Face Hub "
                        f"(tried {'; '.join(failures)}). Check network access or the HF cache, "
                        f"or use task.source=local and {DATA_ROOT_HINT}")

    def _hub_split(self, loaded: Any, source: str, role: str) -> list[Example]:
        if role not in loaded:
            raise DataError(f"{source} has no {role!r} split (it has {list(loaded)}); "
                            f"use task.source=local or another dataset id")
        stem = Path(self.files[role]).stem  # uids match the local files: copa/val/17, sst2/dev/3
        return [self.to_example(RawRow(f"{source}, split {role}: row {i + 1}", i, dict(data)), stem)
                for i, data in enumerate(loaded[role])]

    # ------------------------------------------------------------------ split protocol

    def draw(self, config: TaskConfig, data_root: str | None) -> Drawn:
        """Train/dev/test under `split_protocol` (paper | dev_only | full_test), seeded only by `split_seed`."""
        seed, protocol = config.split_seed, config.split_protocol
        need_train = protocol != "dev_only"
        if config.source == "hub":
            train, validation = self.read_hub(need_train)
        else:
            validation = self.read_local(data_root, "validation")
            train = self._local_train(data_root, protocol) if need_train else None

        notes: list[str] = []
        if not need_train:
            train, dev, test = dev_only_split(validation, seed)
            notes.append(self._dev_only_note(seed, train, dev, test))
        elif self.dev_from_train is not None:            # large tasks: full_test is the paper's split
            dev, train = carve(train, self.dev_from_train, seed)
            test = validation
        elif protocol == "paper":
            dev, test = halve(validation, seed)
        elif self.official_test is not None:
            dev, test = validation, self.read_official_test(data_root, config.source)
            notes.append(f"split_protocol=full_test: test = the official {self.name} test set ({len(test)}, labels "
                         f"from {self.official_test.labels_file}); dev = the whole official validation file "
                         f"({len(dev)}); train = the official train file ({len(train)})")
        else:
            dev, train = carve(train, len(validation) // 2, seed)
            test = validation
            notes.append(f"split_protocol=full_test: test = the whole official validation file ({len(test)}); "
                         f"dev = {len(dev)} rows of the official train file (split_seed={seed}; as many as the "
                         f"paper's dev half), train = the other {len(train)}")
        return Drawn(train, dev, test, notes, self.sources(data_root, config.source, need_train))

    def read_official_test(self, data_root: str | None, source: str) -> list[Example]:
        """The official test set with its separately released labels (`official_test`), from local files."""
        spec = self.official_test
        if source != "local":
            raise DataError(f"split_protocol=full_test reads the {self.name} test labels from "
                            f"<data_root>/{self.task_dir}/{spec.labels_file}, which the Hub does not have; "
                            f"use task.source=local and {DATA_ROOT_HINT}")
        folder = resolve_task_dir(data_root, self.task_dir)
        path, labels_path = folder / spec.file, folder / spec.labels_file
        for needed in (path, labels_path):
            if not needed.is_file():
                raise DataError(f"{needed} is missing; split_protocol=full_test needs the official {self.name} "
                                f"test file and its released labels (see MANIFEST.md); {DATA_ROOT_HINT}")
        rows, labels = read_jsonl(path), spec.read_labels(labels_path)
        if len(rows) != len(labels):
            raise DataError(f"{labels_path}: {len(labels)} labels for the {len(rows)} rows of {path}; expected "
                            f"one label per test row, in file order (replace both with the official files)")
        field = self.label_fields[0]
        return [self.to_example(RawRow(row.where, row.index, {**row.data, field: label}), path.stem)
                for row, label in zip(rows, labels)]

    def sources(self, data_root: str | None, source: str, need_train: bool) -> list[str]:
        """Where the examples came from, for error messages."""
        if source == "hub":
            return ["the Hugging Face Hub (" + " or ".join(p for p, _ in self.hub_ids) + ")"]
        roles = ("train", "validation") if need_train else ("validation",)
        return [str(Path(str(data_root)) / self.task_dir / self.files[role]) for role in roles]

    def _local_train(self, data_root: str | None, protocol: str = "paper") -> list[Example]:
        path = resolve_task_dir(data_root, self.task_dir) / self.files["train"]
        if not path.is_file():
            hub = " or ".join(f"{p}/{c}" if c else p for p, c in self.hub_ids)
            test = ("its test half is the paper protocol's test set" if self.dev_from_train is None
                    else "its test set is half the official validation file, not comparable with paper runs")
            raise DataError(
                f"{path} is missing, and split_protocol={protocol} needs the official {self.name} training file. "
                f"Either load the task from the Hugging Face Hub with task.source=hub ({hub}), "
                f"or use task.split_protocol=dev_only (train/dev carved from the official validation file; "
                f"{test}).")
        return self.read_local(data_root, "train")

    def _dev_only_note(self, seed: int, train: list, dev: list, test: list) -> str:
        val_file = f"{self.name}/{self.files['validation']}"
        if self.dev_from_train is None:
            about_test = f"test ({len(test)}) = the paper protocol's test half, so comparable"
        else:
            about_test = (f"test ({len(test)}) = one half of {val_file}, NOT the paper's test set "
                          f"(all of {val_file}), so not comparable to paper-protocol runs")
        return (f"split_protocol=dev_only: train/dev/test carved from the official validation file "
                f"{val_file} (split_seed={seed}): {about_test}; the other half split 80/20 into "
                f"train ({len(train)}) / dev ({len(dev)}); the official train file is not used")
