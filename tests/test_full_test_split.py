"""split_protocol=full_test (the largest labelled held-out set is the test set) and the separate
dev / test caps (max_dev_samples, max_test_samples) of the CPU protocol."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from papeft.config_checks import ConfigError
from papeft.tasks import DataError, get_task
from papeft.tasks.superglue import read_copa_gold


def full_test(**overrides) -> dict:
    return {"split_protocol": "full_test", **overrides}


def test_copa_full_test_reads_the_official_test_set_with_its_released_labels(root):
    splits = get_task("copa").load(full_test(), root)
    paper = get_task("copa").load({"split_protocol": "paper"}, root)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (400, 100, 500)
    assert [e.uid for e in splits.test[:3]] == ["copa/test/0", "copa/test/1", "copa/test/2"]
    # gold.test: "501 1 0", "502 1 0", "503 0 1" -> choice 1, choice 1, choice 2
    assert [e.response for e in splits.test[:3]] == ["1", "1", "2"]
    assert "Termites invaded the house." in splits.test[2].prompt
    assert {e.uid for e in splits.dev} == {e.uid for e in paper.dev + paper.test}   # the whole val file
    assert {e.response for e in splits.test} == {"1", "2"}
    assert "full_test" in splits.notes[0] and "gold.test" in splits.notes[0]


def test_small_task_full_test_carves_dev_from_train_and_tests_on_the_whole_validation_file(root):
    splits = get_task("rte").load(full_test(), root)
    paper = get_task("rte").load({"split_protocol": "paper"}, root)
    assert len(splits.test) == 277 and {e.uid for e in splits.test} == {e.uid for e in paper.dev + paper.test}
    assert len(splits.dev) == 277 // 2 and len(splits.train) == 2490 - 277 // 2
    assert all(e.uid.startswith("rte/train/") for e in splits.dev + splits.train)
    assert not {e.uid for e in splits.dev} & {e.uid for e in splits.train}
    assert splits == get_task("rte").load(full_test(), root)                      # fixed by split_seed only


def test_large_task_full_test_is_the_paper_split(root):
    assert get_task("sst2").load(full_test(), root) == get_task("sst2").load({"split_protocol": "paper"}, root)


def test_dev_and_test_caps_apart(root):
    splits = get_task("rte").load(full_test(max_eval_samples=50, max_test_samples=200), root)
    assert (len(splits.dev), len(splits.test)) == (50, 200)
    assert any(n.startswith("dev capped to 50 of 138") for n in splits.notes)
    assert any(n.startswith("test capped to 200 of 277") and "not the full test set" in n for n in splits.notes)
    whole = get_task("rte").load(full_test(max_dev_samples=10), root)
    assert (len(whole.dev), len(whole.test)) == (10, 277)
    assert not any(n.startswith("test capped") for n in whole.notes)
    with pytest.raises(ConfigError, match="max_test_samples"):
        get_task("rte").load(full_test(max_test_samples=0), root)


def test_protocols_a_task_family_does_not_have_are_refused():
    with pytest.raises(ConfigError, match="split_protocol"):
        get_task("e2e").parse_config({"split_protocol": "full_test"})
    with pytest.raises(ConfigError, match="full_test"):
        get_task("copa").parse_config({"split_protocol": "full_tests"})


@pytest.fixture
def copa_copy(tmp_path, root) -> Path:
    folder = tmp_path / "copa"
    shutil.copytree(Path(root) / "copa", folder)
    return folder


def test_bad_gold_file_names_the_file_and_line(copa_copy):
    gold = copa_copy / "COPA-resources/results/gold.test"
    lines = gold.read_text().splitlines()
    gold.write_text("\n".join(lines[:2] + ["503 1 1"] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"gold\.test: line 3: '503 1 1'"):
        get_task("copa").load(full_test(), str(copa_copy.parent))
    gold.write_text("\n".join(lines[:2] + lines[3:]) + "\n")                       # item 503 missing
    with pytest.raises(DataError, match=r"line 3: item id 504 after id 502"):
        read_copa_gold(gold)
    gold.write_text("\n".join(lines[:-1]) + "\n")                                    # one label short
    with pytest.raises(DataError, match=r"499 labels for the 500 rows"):
        get_task("copa").load(full_test(), str(copa_copy.parent))
    gold.unlink()
    with pytest.raises(DataError, match="gold.test is missing"):
        get_task("copa").load(full_test(), str(copa_copy.parent))


def test_full_test_needs_the_train_file(tmp_path):
    folder = tmp_path / "boolq"
    folder.mkdir()
    (folder / "val.jsonl").write_text(json.dumps({"passage": "p", "question": "q", "label": True}) + "\n")
    with pytest.raises(DataError, match="split_protocol=full_test needs the official boolq training file"):
        get_task("boolq").load(full_test(), str(tmp_path))
