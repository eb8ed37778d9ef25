"""WikiSQL: loading (counts, tables, errors), gold SQL, execution accuracy, and the SQL sandbox."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from papeft.tasks.base import DataError
from papeft.tasks.sql_sandbox import SandboxLimits, TableSandbox, same_result
from papeft.tasks.wikisql import TEMPLATE, WikiSQLTask, extract_sql
from papeft.tasks.wikisql_rows import read_questions, unique_columns

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEV_ONLY = {"split_protocol": "dev_only"}


@pytest.fixture
def task():
    return WikiSQLTask()


@pytest.fixture
def splits(task):
    return task.load(DEV_ONLY, str(FIXTURES))


def by_question(splits, text):
    return next(e for e in splits.train + splits.dev + splits.test if text in e.prompt)


def no_hub(monkeypatch):
    """Make every hub access fail (as offline) and record the attempts."""
    import datasets

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    return calls


# ---------------------------------------------------------------------------- real data


def test_real_question_files_are_counted_exactly(shared_data):
    dev = read_questions(shared_data / "wikisql" / "dev.jsonl")
    test = read_questions(shared_data / "wikisql" / "test.jsonl")
    assert (len(dev), len(test)) == (8421, 15878)
    assert dev[0].data["table_id"] == "1-10015132-11" and dev[0].data["sql"]["sel"] == 3


def test_real_data_without_tables_says_they_are_missing_and_how_to_get_them(shared_data, task, monkeypatch):
    calls = no_hub(monkeypatch)
    with pytest.raises(DataError, match="tables are missing") as err:
        task.load({**DEV_ONLY, "tables": "local"}, str(shared_data))
    assert "dev.tables.jsonl" in str(err.value) and "data.tar.bz2" in str(err.value) and not calls
    with pytest.raises(DataError, match="tables are missing.*Hugging Face Hub could not") as err:
        task.load(DEV_ONLY, str(shared_data))                    # tables: auto -> tries the hub
    assert calls and "Salesforce/wikisql" in str(err.value)
    with pytest.raises(DataError, match="train.jsonl is missing.*dev_only"):
        task.load({"split_protocol": "paper"}, str(shared_data))


# ---------------------------------------------------------------------------- fixtures: loading


def test_dev_only_split_keeps_the_official_test_set(splits):
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (4, 2, 4)
    assert sorted(e.uid for e in splits.test) == [f"wikisql/test/{i}" for i in range(4)]
    assert {e.uid for e in splits.train + splits.dev} == {f"wikisql/dev/{i}" for i in range(6)}
    assert any("dev_only" in n and "official test set" in n for n in splits.notes)


def test_prompt_template_and_gold_sql(splits):
    ex = by_question(splits, "barton cc")
    assert ex.prompt == TEMPLATE.format(
        question="What position does the player who played for barton cc (ks) play?",
        table_info='table t, columns: "Player" (text), "No." (text), "Nationality" (text), "Position" (text), '
                   '"Years in Toronto" (text), "School/Club Team" (text)')
    assert ex.prompt.endswith("(text).") and ex.answers == (ex.response,)
    assert ex.response == 'SELECT "Position" FROM t WHERE "School/Club Team" = \'Barton CC (KS)\''
    assert by_question(splits, "number 31").response == \
        'SELECT COUNT("School/Club Team") FROM t WHERE "No." = \'31\''          # text column: quoted
    assert by_question(splits, "more than 100").response == \
        'SELECT "Team" FROM t WHERE "Points" > 100 AND "Season" = 2001'         # real columns: numbers
    assert by_question(splits, "coach of Williams").response == \
        'SELECT "Coach\'s ""nickname""" FROM t WHERE "Team" = \'Williams\''      # quotes in a header


def test_gold_sql_runs_and_scores_100(splits, task):
    examples = splits.train + splits.dev + splits.test
    assert task.score([e.response for e in examples], examples) == 100.0
    ex = by_question(splits, "highest number of wins")
    with ex.table.sandbox() as box:
        assert box.run(ex.response).rows == ((13.0,),)


def test_caps_and_bad_config(task):
    capped = task.load({**DEV_ONLY, "max_train_samples": 2, "max_eval_samples": 1}, str(FIXTURES))
    assert (len(capped.train), len(capped.dev), len(capped.test)) == (2, 1, 1)
    with pytest.raises(ValueError, match="task.tables"):
        task.load({**DEV_ONLY, "tables": "somewhere"}, str(FIXTURES))


def copy_questions(tmp_path, with_tables=False):
    folder = tmp_path / "wikisql"
    folder.mkdir()
    for name in ("dev.jsonl", "test.jsonl") + (("dev.tables.jsonl", "test.tables.jsonl") if with_tables else ()):
        shutil.copy(FIXTURES / "wikisql" / name, folder / name)
    return folder


def test_malformed_files_name_file_line_and_fix(tmp_path, task):
    folder = copy_questions(tmp_path, with_tables=True)
    lines = (folder / "dev.jsonl").read_text().splitlines()
    (folder / "dev.jsonl").write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"dev\.jsonl: line 2: invalid JSON.*Fix or remove"):
        task.load(DEV_ONLY, str(tmp_path))
    bad_sel = json.loads(lines[1])
    bad_sel["sql"]["sel"] = 17
    (folder / "dev.jsonl").write_text("\n".join([lines[0], json.dumps(bad_sel), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"dev\.jsonl: line 2: sql .*6 columns"):
        task.load(DEV_ONLY, str(tmp_path))
    unknown = {**json.loads(lines[0]), "table_id": "1-nope"}
    (folder / "dev.jsonl").write_text("\n".join([*lines[:2], json.dumps(unknown), *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=r"dev\.jsonl: line 3: table '1-nope' is not among"):
        task.load(DEV_ONLY, str(tmp_path))
    (folder / "dev.jsonl").write_text("\n".join(lines) + "\n")
    tables = (folder / "test.tables.jsonl").read_text().splitlines()
    short_row = json.loads(tables[1])
    short_row["rows"][2] = ["2003", "Williams"]
    (folder / "test.tables.jsonl").write_text("\n".join([tables[0], json.dumps(short_row)]) + "\n")
    with pytest.raises(DataError, match=r"test\.tables\.jsonl: line 2: row 2 does not have 5 cells"):
        task.load(DEV_ONLY, str(tmp_path))


def hub_layout(question: dict, table: dict) -> dict:
    """A fixture row in the Hugging Face `Salesforce/wikisql` layout (table inside, conds as lists)."""
    conds = question["sql"]["conds"]
    return {"phase": question["phase"], "question": question["question"], "table": table,
            "sql": {"sel": question["sql"]["sel"], "agg": question["sql"]["agg"], "human_readable": "",
                    "conds": {"column_index": [c[0] for c in conds], "operator_index": [c[1] for c in conds],
                              "condition": [str(c[2]) for c in conds]}}}


def fake_hub():
    out = {}
    for split, name in (("validation", "dev"), ("test", "test"), ("train", "dev")):
        tables = {t["id"]: t for t in map(json.loads, (FIXTURES / "wikisql" / f"{name}.tables.jsonl").open())}
        out[split] = [hub_layout(q, tables[q["table_id"]])
                      for q in map(json.loads, (FIXTURES / "wikisql" / f"{name}.jsonl").open())]
    return out


def test_hub_tables_for_local_questions_and_hub_source(tmp_path, task, monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake_hub())
    copy_questions(tmp_path)                                      # questions only, as in shared/data
    local_q = task.load(DEV_ONLY, str(tmp_path))
    assert len(calls) == 1                                        # one hub load serves dev and test
    assert any("tables from the Hugging Face Hub" in n for n in local_q.notes)
    reference = task.load(DEV_ONLY, str(FIXTURES))
    assert sorted((e.uid, e.prompt, e.response) for e in local_q.test) == \
        sorted((e.uid, e.prompt, e.response) for e in reference.test)
    hub = task.load({"split_protocol": "paper", "source": "hub"}, None)
    assert (len(hub.train), len(hub.dev), len(hub.test)) == (6, 6, 4)
    assert by_question(hub, "more than 100").response == \
        'SELECT "Team" FROM t WHERE "Points" > 100 AND "Season" = 2001'
    assert task.score([e.response for e in hub.test], hub.test) == 100.0


# ---------------------------------------------------------------------------- execution accuracy


def test_differently_written_equal_sql_scores_1_and_wrong_column_0(splits, task):
    ex = by_question(splits, "barton cc")
    preds = ['select position from t where "school/club team"=\'barton cc (ks)\'',
             "```sql\nSELECT Position FROM t WHERE `School/Club Team` = 'Barton CC (KS)';\n```",
             'SELECT "Nationality" FROM t WHERE "School/Club Team" = \'Barton CC (KS)\'',
             'SELECT "Positio" FROM t']
    assert [v["correct"] for v in task.verdicts(preds, [ex] * 4)] == [True, True, False, False]
    box = TableSandbox("t", ["col", "x"], ["text", "text"], [["1", "a"], ["2", "b"]])
    quoted, plain = box.run("SELECT \"col\" FROM t WHERE \"x\" = 'a'"), box.run("select col from t where x='a'")
    assert quoted.rows == (("1",),) and same_result(quoted.rows, plain.rows)


def test_results_compare_as_multisets_with_numbers_normalised(splits, task):
    guards = by_question(splits, "played guard")
    wins = by_question(splits, "highest number of wins")
    empty = by_question(splits, "South Australia")                      # gold result: no rows
    cases = [(guards, 'SELECT "Player" FROM t WHERE "Position" = \'Guard\' ORDER BY "Player" DESC', True),
             (guards, 'SELECT "Player" FROM t WHERE "Position" = \'Guard\' LIMIT 1', False),
             (guards, 'SELECT "Player" FROM t WHERE "Position" = \'Guard\' UNION ALL '
                      'SELECT "Player" FROM t WHERE "Position" = \'Guard\'', False),
             (wins, "SELECT 13", True),                                   # int 13 == REAL 13.0
             (wins, "SELECT '13'", False),                               # text is not a number
             (empty, 'SELECT "Notes" FROM t WHERE 1 = 0', True),          # empty equals empty
             (empty, "-- no statement", False)]                          # ... but no query is no result
    verdicts = task.verdicts([c[1] for c in cases], [c[0] for c in cases])
    assert [v["correct"] for v in verdicts] == [c[2] for c in cases]
    assert extract_sql("Here:\n```SQL\nSELECT 1\n```\nDone") == "SELECT 1"


def test_hostile_queries_score_0_and_evaluation_goes_on(splits, task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.db"
    ex = by_question(splits, "barton cc")
    task.limits = SandboxLimits(timeout_s=0.3)
    hostile = {f"ATTACH DATABASE '{evil}' AS evil": "denied",
               "ATTACH 'relative.db' AS r": "denied",
               f"VACUUM INTO '{tmp_path / 'copy.db'}'": "denied",
               "DROP TABLE t": "denied",
               "INSERT INTO t VALUES ('x','x','x','x','x','x')": "denied",
               "UPDATE t SET \"Position\" = 'Guard'": "denied",
               "DELETE FROM t": "denied",
               "PRAGMA query_only=OFF": "denied",
               "BEGIN": "denied",
               "SELECT sql FROM sqlite_master": "denied",
               "SELECT load_extension('x')": "denied",
               "SELECT \"Position\" FROM t; DROP TABLE t": "multiple_statements",
               "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c": "timeout",
               "": "empty",
               "-- a comment is no query": "no_query"}
    valid = 'SELECT "Position" FROM t WHERE "School/Club Team" = \'Barton CC (KS)\''
    generated = [q for q in hostile for _ in (0, 1)]
    generated = [valid if i % 2 else q for i, q in enumerate(generated)]   # each hostile one, then a valid one
    start = time.monotonic()
    result = task.evaluate(lambda prompts: generated, [ex] * len(generated))
    assert time.monotonic() - start < 0.3 + 3.0
    kinds = [row["error_kind"] for row in result.rows]
    assert kinds[0::2] == list(hostile.values()) and kinds[1::2] == [None] * len(hostile)
    assert [row["correct"] for row in result.rows] == [False, True] * len(hostile)
    assert result.score == 50.0 and result.metrics["failed_queries"] == len(hostile)
    assert not evil.exists() and os.listdir(tmp_path) == []


def test_sandbox_table_unchanged_and_limits_hold():
    rows = [[str(i), i] for i in range(30)]
    limits = SandboxLimits(timeout_s=0.25, max_rows=5)
    with TableSandbox("t", ["name", "n"], ["text", "real"], rows, limits) as box:
        for attack in ("DROP TABLE t", "INSERT INTO t VALUES ('a', 1)", "UPDATE t SET n = 0", "DELETE FROM t",
                       "CREATE TABLE u (a)", "ALTER TABLE t RENAME TO u", "SELECT 1; DELETE FROM t",
                       "PRAGMA writable_schema=ON", "SELECT * FROM pragma_table_info('t')", "SELECT randomblob(10)"):
            assert not box.run(attack).ok, attack
        assert box.run("SELECT count(*), sum(n) FROM t").rows == ((30, 435.0),)
        assert box.run("SELECT * FROM t").error_kind == "row_limit"
        assert box.run("SELECT name FROM t WHERE n < 5").rows == (("0",), ("1",), ("2",), ("3",), ("4",))
        start = time.monotonic()
        slow = box.run("SELECT count(*) FROM t a, t b, t c, t d, t e, t f")   # 729M rows without recursion
        assert slow.error_kind == "timeout" and time.monotonic() - start < 0.25 + 1.0
        start = time.monotonic()
        endless = box.run("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c")
        assert endless.error_kind == "timeout" and time.monotonic() - start < 0.25 + 1.0
        assert box.run("SELECT count(*) FROM t").rows == ((30,),)
        assert box.run("SELECT name FROM t WHERE n > 99").rows == ()          # a real empty result
        assert [box.run(q).error_kind for q in (";", "/* x */", "  ")] == ["no_query", "no_query", "empty"]


def test_unique_columns():
    assert unique_columns(["Name", "name", "", "Name"]) == ("Name", "name_2", "col2", "Name_3")


def test_config_composes_and_registers():
    from hydra import compose, initialize_config_dir

    from papeft.tasks.base import TASKS

    with initialize_config_dir(config_dir=str(FIXTURES.parents[1] / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["task=wikisql"])
    assert cfg.task.name == "wikisql" and "wikisql" in TASKS and cfg.task.tables == "auto"
    assert TASKS["wikisql"].metric == "execution_accuracy"
