"""Tests of QNLI, SQuAD v1.1, ReCoRD, E2E and GSM8K: official row counts, templates, split protocols,
malformed input, hub loaders (monkeypatched: no network). Their metrics: test_task_metrics.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import papeft.tasks.generation  # noqa: F401  (importing registers e2e, gsm8k)
import papeft.tasks.glue  # noqa: F401  (qnli)
import papeft.tasks.qa  # noqa: F401  (squad, record)
from conftest import task_config
from papeft.tasks.base import DataError, Example, get_task

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NEW_TASKS = {"qnli": 8, "squad": 32, "record": 32, "e2e": 64, "gsm8k": 256}  # name -> max_new_tokens


def cfg(**overrides) -> dict:
    return {"split_protocol": "paper", "split_seed": 1234, "source": "local",
            "max_train_samples": None, "max_eval_samples": None, **overrides}


def sizes(splits) -> tuple[int, int, int]:
    return len(splits.train), len(splits.dev), len(splits.test)


def uids(examples) -> set[str]:
    return {ex.uid for ex in examples}


# ---------------------------------------------------------------------------- registry and configs


@pytest.mark.parametrize("name,max_new_tokens", sorted(NEW_TASKS.items()))
def test_task_yaml(name, max_new_tokens):
    conf = task_config(name)
    assert set(conf) == {"name", "split_protocol", "split_seed", "source", "max_train_samples",
                         "max_eval_samples", "max_new_tokens"}
    assert conf.name == name and get_task(name).name == name
    assert (conf.split_protocol, conf.split_seed, conf.source) == ("paper", 1234, "local")
    assert conf.max_new_tokens == max_new_tokens


def test_metric_names():
    metrics = {"qnli": "accuracy", "squad": "f1_em", "record": "f1_em", "e2e": "rouge_l", "gsm8k": "accuracy"}
    assert {n: get_task(n).metric for n in NEW_TASKS} == metrics


# ---------------------------------------------------------------------------- official files


@pytest.mark.parametrize("name,role,rows", [
    ("qnli", "validation", 5463), ("squad", "validation", 10570), ("e2e", "train", 42061),
    ("e2e", "validation", 4672), ("e2e", "test", 4693), ("gsm8k", "train", 7473), ("gsm8k", "validation", 1319)])
def test_official_row_counts(root, name, role, rows):
    examples = get_task(name).read_local(root, role)
    assert len(examples) == len(uids(examples)) == rows


def test_qnli_labels_and_template(root):
    examples = get_task("qnli").read_local(root, "validation")
    responses = [ex.response for ex in examples]
    assert (responses.count("entailment"), responses.count("not entailment")) == (2702, 2761)
    assert examples[0].prompt == (
        "sentence 1: What came into force after the new constitution was herald?\n"
        "sentence 2: As of that day, the new constitution heralding the Second Republic came into force.\n"
        "Are sentence 1 and sentence 2 have entailment relation or not?")
    assert examples[1].response == "not entailment"


def test_squad_file_and_template(root):
    task = get_task("squad")
    path = Path(root) / "squad_v1.1" / "dev-v1.1.json"
    assert len(task.read_records(path)) == 48  # articles
    first = task.read_local(root, "validation")[0]
    assert first.uid == "squad/dev-v1.1/0"
    assert first.prompt.startswith("Context:\nSuper Bowl 50 was an American football game")
    assert first.prompt.endswith("\nQuestion:\nWhich NFL team represented the AFC at Super Bowl 50?")
    assert first.response == "Denver Broncos" and first.answers == ("Denver Broncos",) * 3


def test_e2e_official_splits(root):
    splits = get_task("e2e").load(cfg(), root)
    assert sizes(splits) == (42061, 4672, 630) and splits.notes == []
    first = splits.test[0]
    assert first.prompt == ("Reference:\nname[Blue Spice], eatType[coffee shop], area[city centre]\n"
                            "Generate a customer review following the given reference.")
    assert first.answers[:2] == ("A coffee shop in the city centre area called Blue Spice.",
                                 "Blue Spice is a coffee shop in city centre.")
    assert len({ex.prompt for ex in splits.test}) == 630
    rows = get_task("e2e").read_local(root, "test")
    assert {a for ex in splits.test for a in ex.answers} == {ex.response for ex in rows}
    assert splits.train[0].response.startswith("The Vaults pub near Café Adriatic has a 5 star rating.  Prices")
    with pytest.raises(ValueError, match="split_protocol=paper"):
        get_task("e2e").load(cfg(split_protocol="dev_only"), root)


def test_e2e_scores_through_the_task(root):
    test = get_task("e2e").load(cfg(max_eval_samples=5), root).test
    gold = get_task("e2e").evaluate(lambda prompts: [ex.answers[-1] for ex in test], test)
    assert gold.score == pytest.approx(100.0) and gold.metrics["bleu"] == pytest.approx(100.0)
    assert len(gold.rows) == 5 and gold.rows[0]["answers"] == list(test[0].answers)
    empty = get_task("e2e").evaluate(lambda prompts: ["" for _ in prompts], test)
    assert empty.score == 0.0 and empty.metrics == {"bleu": 0.0}


def test_gsm8k_paper_split_and_template(root):
    splits = get_task("gsm8k").load(cfg(), root)
    assert sizes(splits) == (6973, 500, 1319)
    assert all(uid.startswith("gsm8k/train/") for uid in uids(splits.dev))
    assert uids(splits.test) == {f"gsm8k/test/{i}" for i in range(1319)}
    first = get_task("gsm8k").read_local(root, "train")[0]
    assert first.prompt == (
        "Answer the following math quesition:\nNatalia sold clips to 48 of her friends in April, and then she "
        "sold half as many clips in May. How many clips did Natalia sell altogether in April and May?\n"
        "Instruction: please think step by step.")
    assert first.response.startswith("Natalia sold 48/2 = <<48/2=24>>24") and first.response.endswith("#### 72")
    assert first.answers == ("72",)
    assert get_task("gsm8k").score([first.response, "72 clips? no, 71"], [first, first]) == 50.0


@pytest.mark.parametrize("name,expected,file", [
    ("qnli", (2184, 547, 2732), "qnli/dev.tsv"), ("squad", (4228, 1057, 5285), "squad_v1.1/dev-v1.1.json")])
def test_dev_only_sizes_and_note(root, name, expected, file):
    splits = get_task(name).load(cfg(split_protocol="dev_only"), root)
    assert sizes(splits) == expected
    train, dev, test = uids(splits.train), uids(splits.dev), uids(splits.test)
    assert not (train & dev or train & test or dev & test)
    assert splits.notes[0].startswith("split_protocol=dev_only") and file in splits.notes[0]
    assert "not comparable" in splits.notes[0]


@pytest.mark.parametrize("name,missing", [("qnli", "train.tsv"), ("squad", "train-v1.1.json")])
def test_paper_protocol_without_train_names_both_fixes(root, name, missing):
    with pytest.raises(DataError) as info:
        get_task(name).load(cfg(), root)
    message = str(info.value)
    assert missing in message and "task.split_protocol=dev_only" in message and "task.source=hub" in message


# ---------------------------------------------------------------------------- ReCoRD (fixture)


@pytest.fixture
def record_root(tmp_path) -> Path:
    (tmp_path / "record").mkdir()
    shutil.copy(FIXTURES / "record" / "val.jsonl", tmp_path / "record" / "val.jsonl")
    return tmp_path


def test_record_fixture_is_official_format():
    for line in (FIXTURES / "record" / "val.jsonl").read_text().splitlines():
        record = json.loads(line)
        text = record["passage"]["text"]
        for qa in record["qas"]:
            assert "@placeholder" in qa["query"]
            assert all(text[a["start"]:a["end"] + 1] == a["text"] for a in qa["answers"])  # inclusive ends


def test_record_examples(record_root):
    examples = get_task("record").read_local(str(record_root), "validation")
    assert [ex.uid for ex in examples] == [f"record/val/{i}" for i in range(4)]  # 3 passages, 4 queries
    second = examples[1]
    assert second.prompt == (
        "Context:\nArsenal beat Chelsea 2-1 at the Emirates Stadium, with Bukayo Saka scoring the winner.\n"
        "- Saka scores late for Arsenal\n- Chelsea drop to fifth\n"
        "Question:\n@placeholder manager praised his side's late effort.")
    assert second.response == "Arsenal" and second.answers == ("Arsenal", "Arsenal")
    task = get_task("record")
    assert task.score(["lyon!", "The Arsenal", "Chelsea", "Artemis"], examples) == pytest.approx(75.0)
    assert task.extra_metrics(["Lyon city"], examples[:1]) == {"em": 0.0, "f1": pytest.approx(100 * 2 / 3)}


def test_record_protocols(record_root, tmp_path):
    with pytest.raises(DataError, match="train.jsonl.*task.source=hub.*task.split_protocol=dev_only"):
        get_task("record").load(cfg(), str(record_root))
    splits = get_task("record").load(cfg(split_protocol="dev_only"), str(record_root))
    assert sizes(splits) == (1, 1, 2)
    # paper protocol: 1,000 training queries become the dev set, val.jsonl is the test set
    passage = {"text": "Ann met Bob.", "entities": [{"start": 0, "end": 2}]}
    lines = [json.dumps({"passage": passage, "qas": [{"query": f"@placeholder met Bob {i}.", "idx": i,
                                                        "answers": [{"start": 0, "end": 2, "text": "Ann"}]}]})
             for i in range(1003)]
    (record_root / "record" / "train.jsonl").write_text("\n".join(lines) + "\n")
    splits = get_task("record").load(cfg(), str(record_root))
    assert sizes(splits) == (3, 1000, 4) and uids(splits.test) == {f"record/val/{i}" for i in range(4)}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="task directory .*record does not exist.*task.source=hub"):
        get_task("record").load(cfg(split_protocol="dev_only"), str(tmp_path / "empty"))


# ---------------------------------------------------------------------------- malformed input


def write(tmp_path: Path, rel: str, text: str) -> str:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(tmp_path)


GSM = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})


@pytest.mark.parametrize("third_line,problem", [
    (json.dumps({"question": "2+2?", "answer": "it is four"}), "no final number"),
    ('{"question": "2+2?"', "invalid JSON"), (json.dumps({"answer": "#### 4"}), "'question'")])
def test_malformed_gsm8k_line(tmp_path, third_line, problem):
    root = write(tmp_path, "gsm8k/test.jsonl", "\n".join([GSM, GSM, third_line]) + "\n")
    with pytest.raises(DataError) as info:
        get_task("gsm8k").read_local(root, "validation")
    assert "test.jsonl: line 3" in str(info.value) and problem in str(info.value)


E2E_ROWS = 'mr,ref\n"name[A], food[Thai]","A serves\nThai food."\nname[B],B is nice.,extra\n'
QNLI_ROWS = 'index\tquestion\tsentence\tlabel\n0\tWhy "so"?\tBecause.\tentailment\n1\tWhat?\tThat.\tmaybe\n'


@pytest.mark.parametrize("task,path,text,bad,mended,error,first_prompt", [
    ("e2e", "e2e_nlg/devset.csv", E2E_ROWS, ",extra", "", r"devset\.csv: line 4: 3 comma-separated cells",
     "Reference:\nname[A], food[Thai]\n"),                 # line 4: the quoted reference spans lines 2-3
    ("qnli", "qnli/dev.tsv", QNLI_ROWS, "maybe", "not_entailment", r"dev\.tsv: line 3: unknown label 'maybe'",
     'sentence 1: Why "so"?\n')])
def test_malformed_row_is_named_and_the_mended_file_reads(tmp_path, task, path, text, bad, mended, error, first_prompt):
    with pytest.raises(DataError, match=error):
        get_task(task).read_local(write(tmp_path, path, text), "validation")
    examples = get_task(task).read_local(write(tmp_path, path, text.replace(bad, mended)), "validation")
    assert examples[0].prompt.startswith(first_prompt)


def test_e2e_reference_spanning_lines_and_a_wrong_header(tmp_path):
    examples = get_task("e2e").read_local(write(tmp_path, "e2e_nlg/devset.csv", E2E_ROWS.replace(",extra", "")),
                                          "validation")
    assert [ex.response for ex in examples] == ["A serves\nThai food.", "B is nice."]
    with pytest.raises(DataError, match=r"devset\.csv: line 1: header"):
        get_task("e2e").read_local(write(tmp_path, "e2e_nlg/devset.csv", "MR\nname[A]\n"), "validation")


def test_malformed_squad(tmp_path):
    good = {"context": "Paris is in France.", "qas": [{"id": "1", "question": "Where?", "answers": [
        {"answer_start": 9, "text": "France"}]}]}
    bad = {"context": "Oslo.", "qas": [{"id": "2", "question": "What?", "answers": []}]}
    doc = {"version": "1.1", "data": [{"title": "T", "paragraphs": [good, bad]}]}
    root = write(tmp_path, "squad_v1.1/dev-v1.1.json", json.dumps(doc))
    with pytest.raises(DataError, match=r"dev-v1\.1\.json: data\[0\]\.paragraphs\[1\]\.qas\[0\]: field 'answers'"):
        get_task("squad").read_local(root, "validation")
    root = write(tmp_path, "squad_v1.1/dev-v1.1.json", '{"data": [\n{"title": "T",,}]}')
    with pytest.raises(DataError, match=r"dev-v1\.1\.json: line 2 column 15: invalid JSON"):  # the 2nd comma
        get_task("squad").read_local(root, "validation")


def test_malformed_record_line(tmp_path):
    lines = (FIXTURES / "record" / "val.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["qas"][1]["query"]
    root = write(tmp_path, "record/val.jsonl", "\n".join([lines[0], json.dumps(broken)]) + "\n")
    with pytest.raises(DataError, match=r"val\.jsonl: line 2, qas\[1\]: field 'query'"):
        get_task("record").read_local(root, "validation")


# ---------------------------------------------------------------------------- hub loaders (no network)


def fake_hub(monkeypatch, tables: dict) -> list:
    """Replace datasets.load_dataset; `tables` maps (path, name) -> {split: columns}."""
    import datasets

    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        if (path, name) not in tables:
            raise ConnectionError(f"no network for {path}")
        return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns)
                                     for split, columns in tables[(path, name)].items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_squad_dev_only(monkeypatch):
    columns = {"id": ["a", "b", "c", "d"], "title": ["T"] * 4, "context": [f"c{i}" for i in range(4)],
               "question": [f"q{i}" for i in range(4)],
               "answers": [{"text": [f"x{i}", "y"], "answer_start": [0, 1]} for i in range(4)]}
    calls = fake_hub(monkeypatch, {("squad", None): {"train": columns, "validation": columns}})
    splits = get_task("squad").load(cfg(source="hub", split_protocol="dev_only"), None)
    assert calls == [("rajpurkar/squad", None), ("squad", None)] and sizes(splits) == (1, 1, 2)
    example = min(splits.test + splits.train + splits.dev, key=lambda ex: ex.uid)
    assert example == Example("squad/dev-v1.1/0", "Context:\nc0\nQuestion:\nq0", "x0", ("x0", "y"))


def test_hub_record(monkeypatch):
    columns = {"passage": ["Ann met Bob.\n@highlight\nAnn smiles"], "query": ["@placeholder met Bob."],
               "entities": [["Ann", "Bob"]], "answers": [["Ann"]], "idx": [{"passage": 0, "query": 0}]}
    fake_hub(monkeypatch, {("super_glue", "record"): {"train": columns, "validation": columns}})
    [example] = get_task("record").read_hub(need_train=False)[1]
    assert example.prompt == "Context:\nAnn met Bob.\n- Ann smiles\nQuestion:\n@placeholder met Bob."
    assert example.uid == "record/val/0" and example.answers == ("Ann",)


def test_hub_gsm8k_maps_test_to_the_test_set(monkeypatch):
    columns = lambda n: {"question": [f"q{i}" for i in range(n)], "answer": [f"s\n#### {i}" for i in range(n)]}
    fake_hub(monkeypatch, {("openai/gsm8k", "main"): {"train": columns(503), "test": columns(4)}})
    splits = get_task("gsm8k").load(cfg(source="hub"), None)
    assert sizes(splits) == (3, 500, 4) and splits.test[3].answers == ("3",)
    assert uids(splits.test) == {f"gsm8k/test/{i}" for i in range(4)}


def test_hub_e2e_groups_the_test_references(monkeypatch):
    rows = {"meaning_representation": ["name[A]", "name[B]", "name[A]"], "human_reference": ["A1", "B1", "A2"]}
    fake_hub(monkeypatch, {("tuetschek/e2e_nlg", None): {"train": rows, "validation": rows, "test": rows}})
    splits = get_task("e2e").load(cfg(source="hub"), None)
    assert sizes(splits) == (3, 3, 2)
    assert [ex.answers for ex in splits.test] == [("A1", "A2"), ("B1",)]
    assert splits.test[0].uid == "e2e/testset_w_refs/0" and splits.test[1].uid == "e2e/testset_w_refs/1"


def test_hub_qnli_labels(monkeypatch):
    columns = {"question": ["q0", "q1"], "sentence": ["s0", "s1"], "label": [0, 1], "idx": [0, 1]}
    fake_hub(monkeypatch, {("glue", "qnli"): {"train": columns, "validation": columns}})
    _, validation = get_task("qnli").read_hub(need_train=False)
    assert [ex.response for ex in validation] == ["entailment", "not entailment"]


def test_hub_failure_names_every_id(monkeypatch):
    fake_hub(monkeypatch, {})
    with pytest.raises(DataError, match="tuetschek/e2e_nlg.*e2e_nlg.*GEM/e2e_nlg"):
        get_task("e2e").load(cfg(source="hub"), None)
