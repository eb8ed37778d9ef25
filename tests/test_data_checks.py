"""Bad data files fail early and name the place: binary garbage (file and line), empty files and empty
splits (at load time, before any model), and fields of the wrong type (file, line, field)."""
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from papeft.runner import cells as runner
from papeft.tasks import get_task
from papeft.tasks.base import DataError
from papeft.tasks.instruction import InstructionTask
from papeft.tasks.wikisql import WikiSQLTask
from conftest import REPO

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COPA = {"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "cause", "label": 0, "idx": 0}
GARBAGE = bytes(range(128, 256)) * 4                 # what a half-copied binary file looks like: not UTF-8
NO_JUDGE = {"name": "alpaca_mtbench", "judge": {"enabled": False}}


def write(root: Path, name: str, data: bytes | str) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(root)


def copa_lines(n: int) -> list[bytes]:
    return [json.dumps({**COPA, "label": i % 2, "idx": i}).encode() for i in range(n)]


# ---------------------------------------------------------------------------- binary garbage


@pytest.mark.parametrize("task,name,lines,role", [
    ("copa", "copa/val.jsonl", [*copa_lines(2), GARBAGE], "validation"),
    ("sst2", "sst2/dev.tsv", [b"sentence\tlabel", b"good .\t1", GARBAGE + b"\t0"], "validation"),
    ("e2e", "e2e_nlg/devset.csv", [b"mr,ref", b"name[A],A is fine.", GARBAGE], "validation"),
    ("gsm8k", "gsm8k/test.jsonl", [json.dumps({"question": "1+1?", "answer": "#### 2"}).encode()] * 2 + [GARBAGE],
     "validation"),
    ("squad", "squad_v1.1/dev-v1.1.json", [b'{"data": [', b"  ", b'{"title": "' + GARBAGE + b'"}]}'], "validation"),
])
def test_binary_garbage_names_file_and_line(tmp_path, task, name, lines, role):
    root = write(tmp_path, name, b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as info:
        get_task(task).read_local(root, role)
    assert f"{name.split('/')[-1]}: line 3" in str(info.value) and "not UTF-8" in str(info.value)


def test_garbage_in_alpaca_wikisql_and_nul_bytes_name_the_line(tmp_path):
    ok = '{"instruction": "Say hi", "input": "", "output": "Hi"}'
    write(tmp_path, "alpaca/alpagasus_random_9k.json", b"[\n" + ok.encode() + b",\n" + GARBAGE + b"\n]")
    with pytest.raises(DataError, match=r"alpagasus_random_9k\.json: line 3: bytes that are not UTF-8"):
        InstructionTask().load(NO_JUDGE, str(tmp_path))
    folder = tmp_path / "wikisql"
    shutil.copytree(FIXTURES / "wikisql", folder)
    lines = (folder / "dev.jsonl").read_bytes().splitlines()
    (folder / "dev.jsonl").write_bytes(b"\n".join([*lines[:4], GARBAGE, *lines[4:]]))
    with pytest.raises(DataError, match=r"dev\.jsonl: line 5: bytes that are not UTF-8"):
        WikiSQLTask().load({"split_protocol": "dev_only"}, str(tmp_path))
    root = write(tmp_path, "copa/val.jsonl", b"\n".join([*copa_lines(3), b'{"premise": "P\x00\x00\x00"}']))
    with pytest.raises(DataError, match=r"val\.jsonl: line 4: a NUL byte"):
        get_task("copa").read_local(root, "validation")


# ---------------------------------------------------------------------------- empty files, empty splits


@pytest.mark.parametrize("task,name,text", [
    ("copa", "copa/val.jsonl", ""),
    ("copa", "copa/val.jsonl", "\n\n  \n"),
    ("sst2", "sst2/dev.tsv", "sentence\tlabel\n"),                 # a header only
    ("e2e", "e2e_nlg/devset.csv", "mr,ref\n"),
])
def test_an_empty_file_is_refused_naming_it(tmp_path, task, name, text):
    root = write(tmp_path, name, text)
    with pytest.raises(DataError, match=rf"{name.split('/')[-1]}: no rows"):
        get_task(task).read_local(root, "validation")


def test_an_alpaca_file_with_no_items_is_refused(tmp_path):
    write(tmp_path, "alpaca/alpagasus_random_9k.json", "[\n]\n")
    with pytest.raises(DataError, match=r"alpagasus_random_9k\.json: no rows"):
        InstructionTask().load(NO_JUDGE, str(tmp_path))


def test_a_file_too_small_for_its_split_protocol_names_the_file(tmp_path):
    root = write(tmp_path, "copa/val.jsonl", b"\n".join(copa_lines(3)))  # dev_only: half of 3 -> 1 -> train 0
    with pytest.raises(DataError) as info:
        get_task("copa").load({"split_protocol": "dev_only"}, root)
    message = str(info.value)
    assert "train" in message and "no examples" in message and str(tmp_path / "copa" / "val.jsonl") in message


def test_an_empty_validation_file_stops_the_run_before_any_model(tmp_path, monkeypatch):
    root = write(tmp_path / "data", "copa/val.jsonl", "")
    write(tmp_path / "data", "copa/train.jsonl", b"\n".join(copa_lines(40)))
    monkeypatch.setenv("PAPEFT_DATA", root)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(runner, "load_backbone", no_model)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["backbone=tiny_llama", "task=copa", "trainer=default", "wandb.enabled=false",
                                           f"output_root={tmp_path}/runs"])
    with pytest.raises(DataError, match=r"val\.jsonl: no rows"):
        runner.run_single(cfg, 0)


# ---------------------------------------------------------------------------- fields of the wrong type


@pytest.mark.parametrize("row,field", [
    ({**COPA, "premise": {"text": "P."}}, "premise"),
    ({**COPA, "choice1": ""}, "choice1"),
    ({**COPA, "choice2": "   "}, "choice2"),
    ({**COPA, "premise": 17}, "premise"),
    ({**COPA, "question": ["cause"]}, "question"),
])
def test_copa_fields_of_the_wrong_type_name_file_line_field(tmp_path, row, field):
    root = write(tmp_path, "copa/val.jsonl", b"\n".join([*copa_lines(2), json.dumps(row).encode()]))
    with pytest.raises(DataError) as info:
        get_task("copa").read_local(root, "validation")
    assert "val.jsonl: line 3" in str(info.value) and f"field {field!r}" in str(info.value)


def test_an_empty_sst2_sentence_is_refused(tmp_path):
    root = write(tmp_path, "sst2/dev.tsv", "sentence\tlabel\ngood .\t1\n \t0\n")
    with pytest.raises(DataError, match=r"dev\.tsv: line 3: field 'sentence' is an empty string"):
        get_task("sst2").read_local(root, "validation")


@pytest.mark.parametrize("change,where", [
    (lambda q, t: q["sql"]["conds"][0].__setitem__(2, {"value": "x"}), r"dev\.jsonl: line 1: sql"),
    (lambda q, t: q["sql"].__setitem__("sel", True), r"dev\.jsonl: line 1: sql"),
    (lambda q, t: t["rows"][0].__setitem__(1, ["25"]), r"dev\.tables\.jsonl: line 1: field 'rows'"),
    (lambda q, t: t["header"].__setitem__(0, 7), r"dev\.tables\.jsonl: line 1: field 'header'"),
])
def test_wikisql_fields_of_the_wrong_type(tmp_path, change, where):
    folder = tmp_path / "wikisql"
    shutil.copytree(FIXTURES / "wikisql", folder)
    questions = (folder / "dev.jsonl").read_text().splitlines()
    tables = (folder / "dev.tables.jsonl").read_text().splitlines()
    q, t = json.loads(questions[0]), json.loads(tables[0])
    assert q["table_id"] == t["id"] and q["sql"]["conds"]
    change(q, t)
    (folder / "dev.jsonl").write_text("\n".join([json.dumps(q), *questions[1:]]) + "\n")
    (folder / "dev.tables.jsonl").write_text("\n".join([json.dumps(t), *tables[1:]]) + "\n")
    with pytest.raises(DataError, match=where):
        WikiSQLTask().load({"split_protocol": "dev_only"}, str(tmp_path))
