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
from typing import Any, Callable, ClassVar, Mapping, Sequence

from ..config_checks import Check, above, at_least, one_of
from .base import (DATA_ROOT_HINT, DataError, Evaluation, Example, RawRow, Splits, Task, TaskConfig, bad_row, cap,
                   carve, cfg_value, check_limit, read_jsonl, register_task, require_examples, resolve_task_dir)
from .sql_sandbox import SQL_TYPES, SandboxLimits, TableSandbox, quote_identifier, same_result
from .sql_worker import SandboxWorker, TableSpec

AGG_OPS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")
COND_OPS = ("=", ">", "<", "OP")  # "OP" is WikiSQL's unused placeholder: refused
TABLE_NAME = "t"
TEMPLATE = ("Answer the following query by writing a SQL query on the given table:\n{question}\n"
            "Table information:\n{table_info}.")
SPLIT_PROTOCOLS = ("paper", "dev_only")
SOURCES = ("local", "hub")
TABLE_SOURCES = ("auto", "local", "hub")
HUB_ID = "Salesforce/wikisql"
HUB_ATTEMPTS: tuple[tuple[str, dict], ...] = ((HUB_ID, {}), (HUB_ID, {"revision": "refs/convert/parquet"}))
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
DEFAULT_SPLIT_SEED = 1234
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


def is_cell(value: Any) -> bool:
    """A table cell or condition value: text or a number (never a bool, list or object)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Table:
    """One WikiSQL table: column names (made unique), types ("text" | "real") and rows."""

    id: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def info(self) -> str:
        """The prompt's table information: table name, then each quoted column with its type."""
        cols = ", ".join(f"{quote_identifier(c)} ({t})" for c, t in zip(self.columns, self.types))
        return f"table {TABLE_NAME}, columns: {cols}"

    def sandbox(self, limits: SandboxLimits | None = None) -> TableSandbox:
        """The table in an in-process sandbox (evaluation uses `spec()` in a `SandboxWorker`)."""
        return TableSandbox(TABLE_NAME, self.columns, self.types, self.rows, limits)

    def spec(self) -> TableSpec:
        return TableSpec(self.id, TABLE_NAME, self.columns, self.types, self.rows)


@dataclass(frozen=True)
class Query:
    """WikiSQL's structured SQL: selected column, aggregation, conditions (column, op, value)."""

    sel: int
    agg: int
    conds: tuple[tuple[int, int, Any], ...]

    def to_sql(self, table: Table) -> str:
        """The gold SQL string over table `t` (see the module docstring for value rendering)."""
        column = quote_identifier(table.columns[self.sel])
        select = f"{AGG_OPS[self.agg]}({column})" if self.agg else column
        where = [f"{quote_identifier(table.columns[c])} {COND_OPS[o]} {sql_literal(v, table.types[c])}"
                 for c, o, v in self.conds]
        return f"SELECT {select} FROM {TABLE_NAME}" + (f" WHERE {' AND '.join(where)}" if where else "")


@dataclass(frozen=True)
class WikiSQLExample(Example):
    """An Example that also carries its table and structured gold query."""

    table: Table
    query: Query


def as_number(value: Any) -> int | float | None:
    """`value` as a number when it reads as one ("1,234" -> 1234, "2.5" -> 2.5), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        number = float(str(value).replace(",", "").strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def sql_literal(value: Any, column_type: str) -> str:
    """A condition value as an SQL literal: a number on a real column when it reads as one, else a string."""
    number = as_number(value) if column_type == "real" else None
    if number is not None and number == number:  # not NaN
        return repr(number)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = repr(value) if isinstance(value, float) else str(value)
    return "'" + str(value).replace("'", "''") + "'"


def unique_columns(header: Sequence[str]) -> tuple[str, ...]:
    """Header names made usable as SQLite columns: blanks -> col{i}; repeats (any case) -> name_2, ..."""
    seen: set[str] = set()
    out = []
    for i, raw in enumerate(header):
        base = str(raw).strip() or f"col{i}"
        name, k = base, 2
        while name.lower() in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name.lower())
        out.append(name)
    return tuple(out)


def extract_sql(text: str) -> str:
    """The SQL inside a model's answer: the first ``` fenced block if there is one, else the text."""
    fenced = re.search(r"```[ \t]*(?:sql|sqlite)?[ \t]*\n?(.*?)(?:```|$)", text, flags=re.S | re.I)
    return (fenced.group(1) if fenced else text).strip()


# ---------------------------------------------------------------------------- parsing rows


def parse_table(data: Mapping[str, Any], where: str) -> Table:
    """A Table from an official `tables.jsonl` row (or the hub's `table` field)."""
    expected = "a table {id, header: [str], types: ['text'|'real'], rows: [[cell, ...]]}"
    header, types, rows = data.get("header"), data.get("types"), data.get("rows")
    if not isinstance(data.get("id"), str) or not isinstance(header, list) or not isinstance(types, list) \
            or not isinstance(rows, list):
        raise bad_row(where, f"keys {sorted(data)}", expected)
    if not all(isinstance(h, str) for h in header):
        raise bad_row(where, f"field 'header' holds {[type(h).__name__ for h in header]}", expected)
    types = [str(t).lower() for t in types]
    if len(types) != len(header) or any(t not in SQL_TYPES for t in types):
        raise bad_row(where, f"types {types} for {len(header)} columns", expected)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, list) or len(r) != len(header)), None)
    if bad is not None:
        raise bad_row(where, f"row {bad} does not have {len(header)} cells", expected)
    odd = next(((i, c) for i, r in enumerate(rows) for c in r if not is_cell(c)), None)
    if odd is not None:
        raise bad_row(where, f"field 'rows': row {odd[0]} holds a {type(odd[1]).__name__} cell {odd[1]!r}",
                      "cells that are text or numbers")
    return Table(data["id"], unique_columns(header), tuple(types), tuple(tuple(r) for r in rows))


def parse_query(sql: Any, table: Table, where: str) -> Query:
    """A Query from an official `sql` field (conds as triples) or the hub's (conds as parallel lists)."""
    expected = "sql {sel: int, agg: 0-5, conds: [[column, op 0-2, value], ...]} within the table's columns"
    if not isinstance(sql, Mapping):
        raise bad_row(where, f"sql is {type(sql).__name__}", expected)
    conds = sql.get("conds", [])
    if isinstance(conds, Mapping):  # hub layout: {column_index: [...], operator_index: [...], condition: [...]}
        conds = list(zip(conds.get("column_index", []), conds.get("operator_index", []), conds.get("condition", [])))
    n = len(table.columns)
    ok = (is_index(sql.get("sel")) and 0 <= sql["sel"] < n and is_index(sql.get("agg"))
          and 0 <= sql["agg"] < len(AGG_OPS) and isinstance(conds, list)
          and all(isinstance(c, (list, tuple)) and len(c) == 3 and is_index(c[0]) and 0 <= c[0] < n
                  and is_index(c[1]) and 0 <= c[1] < 3 and is_cell(c[2]) for c in conds))
    if not ok:
        raise bad_row(where, f"sql {sql!r} (table {table.id} has {n} columns)", expected)
    return Query(sql["sel"], sql["agg"], tuple((c, o, v) for c, o, v in conds))


def read_questions(path: Path) -> list[RawRow]:
    """The rows of an official question file, each checked for table_id, question and sql."""
    if not path.is_file():
        raise DataError(f"{path} is missing; expected the official WikiSQL question file there; {DATA_ROOT_HINT}")
    rows = read_jsonl(path)
    for row in rows:
        if not isinstance(row.data.get("table_id"), str) or not isinstance(row.data.get("question"), str) \
                or not isinstance(row.data.get("sql"), Mapping):
            raise bad_row(row.where, f"keys {sorted(row.data)}",
                          "{phase, table_id: str, question: str, sql: {sel, agg, conds}}")
    return rows


def read_tables(path: Path) -> dict[str, Table]:
    """Tables by id from an official `{split}.tables.jsonl`."""
    return {t.id: t for t in (parse_table(r.data, r.where) for r in read_jsonl(path))}


def load_hub(failures: list[str]) -> Any | None:
    """The WikiSQL DatasetDict from the Hugging Face Hub (needs network or cache); None on failure."""
    import datasets

    for path, kwargs in HUB_ATTEMPTS:
        try:
            return datasets.load_dataset(path, **kwargs)
        except Exception as exc:  # noqa: BLE001  (no network, script-based dataset, ...: try the next)
            failures.append(f"{path} {kwargs or ''}: {type(exc).__name__}: {exc}".strip())
    return None


def hub_rows(loaded: Any, role: str) -> list[RawRow]:
    """Hub rows of one split as official-format question rows (the table stays in `table`)."""
    split = HUB_SPLITS[role]
    if split not in loaded:
        raise DataError(f"hub dataset {HUB_ID} has no {split!r} split (it has {list(loaded)})")
    return [RawRow(f"hub dataset {HUB_ID}, split {split}: row {i + 1}", i,
                   {**dict(data), "table_id": dict(data.get("table") or {}).get("id")})
            for i, data in enumerate(loaded[split])]


def hub_tables(rows: Sequence[RawRow]) -> dict[str, Table]:
    """Tables by id from hub rows (each question row embeds its table)."""
    tables: dict[str, Table] = {}
    for row in rows:
        table = row.data.get("table")
        if isinstance(table, Mapping) and table.get("id") not in tables:
            tables[table["id"]] = parse_table(table, row.where)
    return tables


# ---------------------------------------------------------------------------- the task


class WikiSQLTask(Task):
    """WikiSQL under the paper's template, scored by execution accuracy in a SQL sandbox."""

    name = "wikisql"
    metric = "execution_accuracy"
    task_dir = "wikisql"
    config_cls = WikiSQLConfig

    def __init__(self) -> None:
        self.limits = SandboxLimits()

    def load(self, cfg: Any, data_root: str | None) -> Splits:
        protocol = cfg_value(cfg, "split_protocol", "paper")
        source = cfg_value(cfg, "source", "local")
        tables_from = cfg_value(cfg, "tables", "auto")
        seed = int(cfg_value(cfg, "split_seed", DEFAULT_SPLIT_SEED))
        max_train = check_limit("max_train_samples", cfg_value(cfg, "max_train_samples"))
        max_eval = check_limit("max_eval_samples", cfg_value(cfg, "max_eval_samples"))
        for key, value, allowed in (("split_protocol", protocol, SPLIT_PROTOCOLS), ("source", source, SOURCES),
                                    ("tables", tables_from, TABLE_SOURCES)):
            if value not in allowed:
                raise ValueError(f"task.{key} must be one of {allowed}, got {value!r}")
        self.limits = SandboxLimits(timeout_s=float(cfg_value(cfg, "sql_timeout_s", 1.0)),
                                    max_rows=int(cfg_value(cfg, "sql_max_rows", 10_000)))
        roles = ("train", "dev", "test") if protocol == "paper" else ("dev", "test")
        notes: list[str] = []
        if source == "hub":
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
            found = self._read_local(data_root, roles, protocol, tables_from, notes)

        if protocol == "dev_only":
            n_dev = len(found["dev"]) - len(found["dev"]) * 4 // 5
            dev, train = carve(found["dev"], n_dev, seed)
            notes.append(f"split_protocol=dev_only: train ({len(train)}) / dev ({len(dev)}) carved 80/20 from the "
                         f"official WikiSQL dev set (split_seed={seed}), so training uses no official train data; "
                         f"test ({len(found['test'])}) = the official test set, as in the paper")
        else:
            train, dev = found["train"], found["dev"]
        test = found["test"]
        if max_train is not None and max_train < len(train):
            notes.append(f"max_train_samples={max_train}: train capped from {len(train)} examples")
        if max_eval is not None and max_eval < max(len(dev), len(test)):
            notes.append(f"max_eval_samples={max_eval}: dev ({len(dev)}) and test ({len(test)}) each capped; "
                         f"test is not the full test set")
        splits = Splits(cap(train, max_train, seed), cap(dev, max_eval, seed), cap(test, max_eval, seed), notes)
        sources = [HUB_ID] if source == "hub" else [Path(str(data_root)) / self.task_dir / f"{r}.jsonl" for r in roles]
        return require_examples(splits, self.name, sources)

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
