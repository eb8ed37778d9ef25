"""Tests of the task registry: official row counts, the split protocol, templates, errors, metric, hub."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import task_config
from papeft.tasks import TASKS, DataError, Example, Splits, get_task
from papeft.tasks.base import RawRow

TASK_NAMES = ("copa", "boolq", "rte", "sst2")


def cfg(**overrides) -> dict:
    base = {"split_protocol": "paper", "split_seed": 1234, "source": "local",
            "max_train_samples": None, "max_eval_samples": None}
    return {**base, **overrides}


def uids(examples: list[Example]) -> set[str]:
    return {ex.uid for ex in examples}


# ---------------------------------------------------------------------------- registry and configs


def test_registry_has_the_four_tasks():
    assert set(TASK_NAMES) <= set(TASKS)
    for name in TASK_NAMES:
        assert get_task(name).name == name and get_task(name).metric == "accuracy"
    with pytest.raises(KeyError, match="copa"):
        get_task("mnli")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_yaml(name):
    conf = task_config(name)
    assert set(conf) == {"name", "split_protocol", "split_seed", "source", "max_train_samples",
                         "max_eval_samples", "max_new_tokens"}
    assert conf.name == name and conf.split_protocol == "paper" and conf.split_seed == 1234
    assert conf.source == "local" and conf.max_new_tokens >= 4


# ---------------------------------------------------------------------------- official files

ROW_COUNTS = [("copa", "train", 400), ("copa", "validation", 100), ("rte", "train", 2490),
              ("rte", "validation", 277), ("boolq", "validation", 3270), ("sst2", "train", 67349),
              ("sst2", "validation", 872)]


@pytest.mark.parametrize("name,role,rows", ROW_COUNTS)
def test_official_row_counts(root, name, role, rows):
    examples = get_task(name).read_local(root, role)
    assert len(examples) == rows
    assert len(uids(examples)) == rows


def test_copa_template_on_a_real_row(root):
    first = get_task("copa").read_local(root, "validation")[0]
    assert first.uid == "copa/val/0"
    assert first.prompt == ("Premise:\nThe man turned on the faucet.\n"
                            "Choice 1: The toilet filled with water.\nChoice 2: Water flowed from the spout.\n"
                            "Question:\nWhat happened as a result?")
    assert first.response == "2" and first.answers == ("2",)
    assert get_task("copa").read_local(root, "train")[0].prompt.endswith("Question:\nWhat was the cause?")


def test_rte_template_on_a_real_row(root):
    first = get_task("rte").read_local(root, "validation")[0]
    assert first.prompt == (
        "sentence 1: Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation.\nsentence 2: Christopher Reeve had an accident.\n"
        "Are sentence 1 and sentence 2 have entailment relation or not?")
    assert first.response == "not entailment"


def test_boolq_and_sst2_templates(root):
    boolq = get_task("boolq").read_local(root, "validation")[0]
    assert boolq.prompt.startswith("Reference document:\nEthanol fuel -- All biomass")
    assert boolq.prompt.endswith("\nQuestion:\ndoes ethanol take more energy make that produces")
    assert boolq.response == "no"
    sst2 = get_task("sst2").read_local(root, "validation")[0]
    assert sst2.prompt == ("it 's a charming and often affecting journey .\n"
                           "The sentiment of the given sentence is:")
    assert sst2.response == "positive"


# ---------------------------------------------------------------------------- split protocol


@pytest.mark.parametrize("name,sizes", [("copa", (400, 50, 50)), ("rte", (2490, 138, 139)),
                                        ("sst2", (66349, 1000, 872))])
def test_paper_split_sizes_and_disjointness(root, name, sizes):
    splits = get_task(name).load(cfg(), root)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == sizes
    assert splits.notes == []
    train, dev, test = uids(splits.train), uids(splits.dev), uids(splits.test)
    assert len(train) + len(dev) + len(test) == sum(sizes)
    assert not (train & dev or train & test or dev & test)
    official_val = uids(get_task(name).read_local(root, "validation"))
    if name == "sst2":  # dev carved from train, official dev.tsv is the test set
        assert test == official_val and all(uid.startswith("sst2/train/") for uid in dev)
    else:  # official validation halved into dev and test
        assert dev | test == official_val and all(uid.startswith(f"{name}/train/") for uid in train)


def test_split_is_deterministic_and_ignores_the_run_seed(root):
    task = get_task("rte")
    random.seed(1)  # the run seeds the global generators; the task config has no run seed (a `seed` key is refused)
    first = task.load(cfg(), root)
    random.seed(99)
    second = task.load(cfg(), root)
    assert first == second
    other = task.load(cfg(split_seed=4321), root)
    assert uids(other.test) != uids(first.test)


def test_dev_only_boolq(root):
    splits = get_task("boolq").load(cfg(split_protocol="dev_only"), root)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (1308, 327, 1635)
    train, dev, test = uids(splits.train), uids(splits.dev), uids(splits.test)
    assert not (train & dev or train & test or dev & test)
    assert any(note.startswith("split_protocol=dev_only") for note in splits.notes)


def test_dev_only_keeps_the_paper_test_set(root):
    paper = get_task("copa").load(cfg(), root)
    dev_only = get_task("copa").load(cfg(split_protocol="dev_only"), root)
    assert dev_only.test == paper.test
    assert (len(dev_only.train), len(dev_only.dev)) == (40, 10)
    assert uids(dev_only.train) | uids(dev_only.dev) == uids(paper.dev)


def test_dev_only_sst2_splits_dev_tsv(root):
    splits = get_task("sst2").load(cfg(split_protocol="dev_only"), root)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (348, 88, 436)
    assert all(uid.startswith("sst2/dev/") for uid in uids(splits.train) | uids(splits.dev))
    assert "not comparable" in splits.notes[0]


def test_paper_protocol_without_boolq_train_names_both_fixes(root):
    with pytest.raises(DataError) as info:
        get_task("boolq").load(cfg(), root)
    message = str(info.value)
    assert "train.jsonl" in message and "task.split_protocol=dev_only" in message
    assert "task.source=hub" in message


def test_caps_are_deterministic_subsets(root):
    full = get_task("rte").load(cfg(), root)
    capped = get_task("rte").load(cfg(max_train_samples=32, max_eval_samples=10), root)
    assert (len(capped.train), len(capped.dev), len(capped.test)) == (32, 10, 10)
    assert uids(capped.train) <= uids(full.train) and uids(capped.test) <= uids(full.test)
    assert capped == get_task("rte").load(cfg(max_train_samples=32, max_eval_samples=10), root)
    assert any("max_train_samples=32" in n for n in capped.notes)
    assert any("max_eval_samples=10" in n for n in capped.notes)
    with pytest.raises(ValueError, match="max_train_samples"):
        get_task("rte").load(cfg(max_train_samples=-1), root)


def test_load_accepts_an_omegaconf_config(root):
    conf = task_config("copa")
    splits = get_task("copa").load(conf, root)
    assert isinstance(splits, Splits) and len(splits.test) == 50


# ---------------------------------------------------------------------------- errors

COPA_ROW = {"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "cause", "label": 0, "idx": 0}


def write_copa_root(tmp_path: Path, third_line: str) -> Path:
    lines = [json.dumps(COPA_ROW), json.dumps({**COPA_ROW, "label": 1}), third_line, "", ""]
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "val.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("third_line,problem", [
    ('{"premise": "P.", "choice1"', "invalid JSON"),
    (json.dumps({k: v for k, v in COPA_ROW.items() if k != "choice2"}), "choice2"),
    (json.dumps({**COPA_ROW, "label": 2}), "unknown label"),
    (json.dumps({**COPA_ROW, "question": "why"}), "'question'"),
])
def test_malformed_row_names_file_and_line(tmp_path, third_line, problem):
    root = write_copa_root(tmp_path, third_line)
    with pytest.raises(DataError) as info:
        get_task("copa").load(cfg(split_protocol="dev_only"), str(root))
    message = str(info.value)
    assert "val.jsonl" in message and "line 3" in message and problem in message
    assert "expected" in message


def test_trailing_blank_lines_are_fine(tmp_path):
    root = write_copa_root(tmp_path, json.dumps({**COPA_ROW, "question": "effect"}))
    examples = get_task("copa").read_local(str(root), "validation")
    assert [ex.response for ex in examples] == ["1", "2", "1"]
    assert examples[2].prompt.endswith("What happened as a result?")


def test_malformed_tsv_row(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\ngood .\t1\nbad .\t0\textra\n")
    with pytest.raises(DataError, match=r"dev\.tsv: line 3"):
        get_task("sst2").read_local(str(tmp_path), "validation")


@pytest.mark.parametrize("data_root", [None, "/nonexistent/papeft-data"])
def test_missing_data_root(data_root):
    with pytest.raises(DataError, match="PAPEFT_DATA") as info:
        get_task("copa").load(cfg(), data_root)
    if data_root:
        assert data_root in str(info.value)


# ---------------------------------------------------------------------------- metric


@pytest.mark.parametrize("prediction,gold,correct", [
    ("Yes.", "yes", True), ("yes, because the passage says so", "yes", True), ("yesterday", "yes", False),
    ("no", "yes", False), ("1\n", "1", True), ("2", "1", False), ("12", "1", False),
    (" Positive! ", "positive", True), ('"negative"', "negative", True),
    ("not entailment", "entailment", False), ("not_entailment", "not entailment", True),
    ("Not entailment.", "not entailment", True), ("entailment", "not entailment", False),
    ("entailment, clearly", "entailment", True), ("not   entailment", "not entailment", True),
])
def test_accuracy_cases(prediction, gold, correct):
    task = get_task("rte") if "entail" in gold else get_task("boolq")
    example = Example("x/val/0", "prompt", gold, (gold,))
    assert task.score([prediction], [example]) == (100.0 if correct else 0.0)


def test_longest_label_wins_over_a_gold_prefix():
    from papeft.tasks.metrics import is_correct

    assert is_correct("a b c", ["a"])  # gold followed by a boundary
    assert not is_correct("a b c", ["a"], labels=["a", "a b"])  # but it is really the label "a b"
    assert is_correct("a b.", ["a b"], labels=["a", "a b"])


def test_accuracy_is_a_percentage():
    examples = [Example(f"copa/val/{i}", "p", r, (r,)) for i, r in enumerate("1212")]
    assert get_task("copa").score(["1", "2", "2", "2."], examples) == 75.0
    with pytest.raises(ValueError):
        get_task("copa").score(["1"], examples)


# ---------------------------------------------------------------------------- hub loader (no network)


def fake_hub(monkeypatch, tables: dict, fail: tuple = ()) -> list:
    """Replace datasets.load_dataset; `tables` maps (path, name) -> {split: columns}."""
    import datasets

    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        if (path, name) in fail or (path, name) not in tables:
            raise ConnectionError(f"no network for {path}")
        return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns)
                                     for split, columns in tables[(path, name)].items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def rte_columns(n: int) -> dict:
    return {"premise": [f"p{i}" for i in range(n)], "hypothesis": [f"h{i}" for i in range(n)],
            "idx": list(range(n)), "label": [i % 2 for i in range(n)]}


def test_hub_loader_maps_splits_and_labels(monkeypatch):
    calls = fake_hub(monkeypatch, {("super_glue", "rte"): {
        "train": rte_columns(6), "validation": rte_columns(10), "test": rte_columns(3)}})
    splits = get_task("rte").load(cfg(source="hub"), data_root=None)
    assert calls == [("super_glue", "rte")]
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (6, 5, 5)
    assert splits.train[0] == Example("rte/train/0", "sentence 1: p0\nsentence 2: h0\n"
                                      "Are sentence 1 and sentence 2 have entailment relation or not?",
                                      "entailment", ("entailment",))
    assert splits.train[1].response == "not entailment"  # hub ClassLabel 1 = not_entailment
    assert uids(splits.dev) | uids(splits.test) == {f"rte/val/{i}" for i in range(10)}


def test_hub_loader_falls_back_to_the_next_id(monkeypatch):
    columns = {"question": ["is it", "is it not"], "passage": ["doc", "doc2"], "answer": [True, False]}
    calls = fake_hub(monkeypatch, {("google/boolq", None): {"train": columns, "validation": columns}},
                     fail=(("super_glue", "boolq"),))
    splits = get_task("boolq").load(cfg(source="hub"), data_root=None)
    assert calls == [("super_glue", "boolq"), ("aps/super_glue", "boolq"), ("google/boolq", None)]
    assert [ex.response for ex in splits.train] == ["yes", "no"]
    assert splits.train[0].prompt == "Reference document:\ndoc\nQuestion:\nis it"


def test_hub_loader_failure_is_a_data_error(monkeypatch):
    fake_hub(monkeypatch, {})
    with pytest.raises(DataError, match="super_glue/copa.*aps/super_glue/copa"):
        get_task("copa").load(cfg(source="hub"), data_root=None)


def test_an_unknown_task_key_is_an_error_naming_the_key_and_the_task(root):
    with pytest.raises(ValueError, match=r"task rte: unknown key\(s\) \['seed'\] in task config"):
        get_task("rte").load({**cfg(), "seed": 1}, root)
    with pytest.raises(ValueError, match=r"task copa: task\.split_protocol='random'"):
        get_task("copa").load(cfg(split_protocol="random"), root)


def test_boolq_reads_bool_and_hub_int_labels():
    """Local BoolQ files hold JSON bools, the hub's ClassLabel ints 0/1: both map to the label words
    (with bool and int dict keys, 1 == True collapsed the two and the hub's 1 was an unknown label)."""
    task = get_task("boolq")
    row = {"question": "is it?", "passage": "It is."}
    words = [task.to_example(RawRow(f"row {i}", i, {**row, "label": label}), "test").response
             for i, label in enumerate([True, False, 1, 0])]
    assert words == ["yes", "no", "yes", "no"]
