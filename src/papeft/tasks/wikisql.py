"""WikiSQL (Zhong et al., 2017): question + table -> SQL, scored by execution accuracy (and logical form).

Official files: `{split}.jsonl` questions `{phase, table_id, question, sql: {sel, agg, conds}}`
and `{split}.tables.jsonl` tables `{id, header, types, rows}`. Only the question files of dev and
test may be present (shared/data has no tables): the prompt's table information and execution
both need the tables, so they come from `{split}.tables.jsonl` beside the questions, or from the
Hugging Face Hub (`Salesforce/wikisql`); without either, loading stops with a DataError that says
how to get them.

Our readings (the papers are silent):
* the table is called `t` and columns are double-quoted header names (a blank header becomes
  `col{i}`; a repeated one, case-insensitively, gets `_2`, `_3`, ...); text columns compare
  case-insensitively (COLLATE NOCASE), like the official evaluation, which lower-cases;
* the gold SQL is built from the structured `sql`; a condition value on a `real` column that
  reads as a number (thousands commas dropped) is written as a number, any other value as a
  quoted string;
* table information = table name + column names + types, no rows;
* execution accuracy: the predicted and gold SQL, each run in the sandbox (`sql_sandbox.py`, in
  a separate, killable worker process: `sql_worker.py`) on the example's table, return the same
  rows as multisets (numbers compared as floats). A prediction that fails (hostile, not a single
  SELECT, invalid, too slow, too big) scores 0; a gold query that fails also scores 0 and is
  counted in `gold_errors`;
* logical-form accuracy (reported beside it, `logical_form_accuracy`): the prediction's canonical
  SQL (`sql_sandbox.canonical_sql`: sqlparse tokens, case, quoting and whitespace normalised,
  numbers as numbers, the WHERE conditions as a set, like the official metric) equals the gold's;
* a prediction in a ``` fence is read from inside the fence; nothing else is repaired;
* `split_protocol: dev_only` (train.jsonl absent): train/dev are carved 80/20 from dev.jsonl and
  the official test.jsonl stays the test set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..config_checks import Check, above, at_least, one_of
from .base import (DATA_ROOT_HINT, DataError, Drawn, Evaluation, Example, RawRow, Task, TaskConfig, bad_row, carve,
                   register_task, resolve_task_dir)
from .sql_sandbox import SandboxLimits, same_result
from .sql_worker import SandboxWorker, TableSpec
from .wikisql_rows import HUB_ID, Query, Table, hub_rows, hub_tables, load_hub, parse_query, read_questions, read_tables

TEMPLATE = ("Answer the following query by writing a SQL query on the given table:\n{question}\n"
            "Table information:\n{table_info}.")
TABLE_SOURCES = ("auto", "local", "hub")
TABLES_HINT = ("get the official tables from the WikiSQL release (github.com/salesforce/WikiSQL, "
               "data.tar.bz2) and put {split}.tables.jsonl next to {split}.jsonl, or, with network access, "
               f"set task.tables=hub (or task.source=hub) to read them from the Hugging Face Hub ({HUB_ID})")


@dataclass
class WikiSQLConfig(TaskConfig):
    """configs/task/wikisql.yaml: the shared task keys plus where tables come from and the sandbox limits."""

    tables: str = "auto"                     # auto | local | hub (with source=local)
    sql_timeout_s: float = 1.0               # wall clock of one query in the SQL sandbox
    sql_max_rows: int = 10_000               # a query returning more rows fails

    CHECKS: ClassVar[dict[str, Check]] = {**TaskConfig.CHECKS, "tables": one_of(*TABLE_SOURCES),
                                          "sql_timeout_s": above(0.0), "sql_max_rows": at_least(1)}


@dataclass(frozen=True)
class WikiSQLExample(Example):
    """An Example that also carries its table and structured gold query."""

    table: Table
    query: Query


def extract_sql(text: str) -> str:
    """The SQL inside a model's answer: the first ``` fenced block if there is one, else the text."""
    fenced = re.search(r"```[ \t]*(?:sql|sqlite)?[ \t]*\n?(.*?)(?:```|$)", text, flags=re.S | re.I)
    return (fenced.group(1) if fenced else text).strip()


# ---------------------------------------------------------------------------- the task


class WikiSQLTask(Task):
    """WikiSQL under the paper's template, scored by execution accuracy in a SQL sandbox."""

    name = "wikisql"
    metric = "execution_accuracy"
    task_dir = "wikisql"
    config_cls = WikiSQLConfig
    cap_how = ""

    def __init__(self) -> None:
        self.limits = SandboxLimits()

    def draw(self, config: WikiSQLConfig, data_root: str | None) -> Drawn:
        """Official train/dev/test (paper), or train/dev carved 80/20 from dev (dev_only); tables
        from `{split}.tables.jsonl` or the hub, as `config.tables` says."""
        self.limits = SandboxLimits(timeout_s=config.sql_timeout_s, max_rows=config.sql_max_rows)
        protocol, seed = config.split_protocol, config.split_seed
        roles = ("train", "dev", "test") if protocol == "paper" else ("dev", "test")
        notes: list[str] = []
        if config.source == "hub":
            failures: list[str] = []
            loaded = load_hub(failures)
            if loaded is None:
                raise DataError(f"could not load WikiSQL from the Hugging Face Hub (tried {'; '.join(failures)}); "
                                f"check network access or the HF cache, or use task.source=local and {DATA_ROOT_HINT}")
            found = {}
            for role in roles:
                rows = hub_rows(loaded, role)
                tables = hub_tables(rows)
                found[role] = [self.to_example(row, role, tables.get) for row in rows]
            notes.append(f"WikiSQL questions and tables from the Hugging Face Hub ({HUB_ID})")
        else:
            found = self._read_local(data_root, roles, protocol, config.tables, notes)

        if protocol == "dev_only":
            n_dev = len(found["dev"]) - len(found["dev"]) * 4 // 5
            dev, train = carve(found["dev"], n_dev, seed)
            notes.append(f"split_protocol=dev_only: train ({len(train)}) / dev ({len(dev)}) carved 80/20 from the "
                         f"official WikiSQL dev set (split_seed={seed}), so training uses no official train data; "
                         f"test ({len(found['test'])}) = the official test set, as in the paper")
        else:
            train, dev = found["train"], found["dev"]
        sources = ([HUB_ID] if config.source == "hub"
                   else [Path(str(data_root)) / self.task_dir / f"{r}.jsonl" for r in roles])
        return Drawn(train, dev, found["test"], notes, sources)

    def _read_local(self, data_root: str | None, roles: Sequence[str], protocol: str, tables_from: str,
                    notes: list[str]) -> dict[str, list[WikiSQLExample]]:
        folder = resolve_task_dir(data_root, self.task_dir)
        if protocol == "paper" and not (folder / "train.jsonl").is_file():
            raise DataError(f"{folder / 'train.jsonl'} is missing, and split_protocol=paper needs the official "
                            f"WikiSQL training file. Use task.split_protocol=dev_only (train/dev carved from "
                            f"dev.jsonl, the official test.jsonl stays the test set) or task.source=hub ({HUB_ID}).")
        questions = {r: read_questions(folder / f"{r}.jsonl") for r in roles}  # question files first
        hub: list[Any] = []  # loaded at most once, only if some split lacks a local tables file
        found = {}
        for role in roles:
            tables = self._tables_for(folder, role, tables_from, hub, notes)
            found[role] = [self.to_example(row, role, tables.get) for row in questions[role]]
        return found

    def _tables_for(self, folder: Path, role: str, tables_from: str, hub: list[Any],
                    notes: list[str]) -> dict[str, Table]:
        path = folder / f"{role}.tables.jsonl"
        if tables_from != "hub" and path.is_file():
            notes.append(f"WikiSQL {role} tables from {path}")
            return read_tables(path)
        hint = TABLES_HINT.format(split=role)
        if tables_from == "local":
            raise DataError(f"WikiSQL tables are missing: {path} does not exist, and the {role} questions need "
                            f"their tables (for the prompt's table information and for execution accuracy); {hint}")
        failures: list[str] = []
        if not hub:
            hub.append(load_hub(failures))
        if hub[0] is None:
            raise DataError(f"WikiSQL tables are missing: {path} does not exist and the Hugging Face Hub could not "
                            f"be reached (tried {'; '.join(failures) or HUB_ID}); the {role} questions need their "
                            f"tables (for the prompt's table information and for execution accuracy); {hint}")
        notes.append(f"WikiSQL {role} tables from the Hugging Face Hub ({HUB_ID})")
        return hub_tables(hub_rows(hub[0], role))

    def to_example(self, row: RawRow, role: str, table_of: Callable[[str], Table | None]) -> WikiSQLExample:
        """Fill the template for one question row; its table comes from `table_of(table_id)`."""
        table_id = row.data.get("table_id")
        table = table_of(table_id) if isinstance(table_id, str) else None
        if table is None:
            raise bad_row(row.where, f"table {table_id!r} is not among the loaded tables",
                          f"a table_id present in {role}.tables.jsonl; {TABLES_HINT.format(split=role)}")
        question = row.data.get("question")
        if not isinstance(question, str) or not question.strip():
            raise bad_row(row.where, "no question text", "a non-empty string in 'question'")
        query = parse_query(row.data.get("sql"), table, row.where)
        gold = query.to_sql(table)
        prompt = TEMPLATE.format(question=question.strip(), table_info=table.info())
        return WikiSQLExample(f"{self.name}/{role}/{row.index}", prompt, gold, (gold,), table, query)

    # ------------------------------------------------------------------ scoring

    def verdicts(self, predictions: Sequence[str], examples: Sequence[Example]) -> list[dict]:
        """Per example: whether the prediction's result equals the gold result (`correct`), whether its
        canonical SQL equals the gold's (`lf_match`), and why not."""
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        specs: dict[str, TableSpec] = {}
        out = []
        with SandboxWorker(self.limits) as worker:
            for pred, ex in zip(predictions, examples):
                if not isinstance(ex, WikiSQLExample):
                    raise TypeError(f"example {ex.uid} has no table; load it with WikiSQLTask.load")
                spec = specs.get(ex.table.id) or specs.setdefault(ex.table.id, ex.table.spec())
                gold, guess = worker.run(spec, ex.response), worker.run(spec, extract_sql(str(pred)))
                out.append({"correct": bool(gold.ok and guess.ok and same_result(gold.rows, guess.rows)),
                            "lf_match": gold.canonical is not None and guess.canonical == gold.canonical,
                            "error_kind": guess.error_kind, "error": guess.error,
                            "gold_error": gold.error})
        return out

    def score(self, predictions: list[str], examples: list[Example]) -> float:
        """Execution accuracy in percent."""
        if not examples:
            raise ValueError("no examples to score")
        return 100.0 * sum(v["correct"] for v in self.verdicts(predictions, examples)) / len(examples)

    def extra_metrics(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Logical-form accuracy, exact SQL match and the failure counts, beside execution accuracy."""
        return self._metrics(predictions, examples, self.verdicts(predictions, examples))

    @staticmethod
    def _metrics(preds: list[str], examples: list[Example], verdicts: list[dict]) -> dict[str, float]:
        n = max(len(examples), 1)
        return {"failed_queries": float(sum(v["error_kind"] is not None for v in verdicts)),
                "gold_errors": float(sum(v["gold_error"] is not None for v in verdicts)),
                "logical_form_accuracy": 100.0 * sum(v["lf_match"] for v in verdicts) / n,
                "exact_sql_match": 100.0 * sum(extract_sql(p).strip() == e.response
                                               for p, e in zip(preds, examples)) / n}

    def evaluate(self, generate: Callable[[list], list[str]], examples: list[Example]) -> Evaluation:
        preds = generate([e.prompt for e in examples])
        verdicts = self.verdicts(preds, examples)
        rows = [{"uid": e.uid, "prediction": p, "answers": list(e.answers), **v}
                for e, p, v in zip(examples, preds, verdicts)]
        n = max(len(examples), 1)
        return Evaluation(100.0 * sum(v["correct"] for v in verdicts) / n,
                          self._metrics(preds, examples, verdicts), rows)


WIKISQL = register_task(WikiSQLTask())
