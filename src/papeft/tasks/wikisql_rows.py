"""WikiSQL's data as Python values: tables (`Table`), structured gold queries (`Query`) and the
gold SQL they make, read from the official files or the Hugging Face Hub's rows. The task, its
template and our readings of the papers: `wikisql.py`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .base import DATA_ROOT_HINT, DataError, RawRow, bad_row, read_jsonl
from .sql_sandbox import SQL_TYPES, SandboxLimits, TableSandbox, quote_identifier
from .sql_worker import TableSpec


AGG_OPS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")
COND_OPS = ("=", ">", "<", "OP")  # "OP" is WikiSQL's unused placeholder: refused
TABLE_NAME = "t"
HUB_ID = "Salesforce/wikisql"
HUB_ATTEMPTS: tuple[tuple[str, dict], ...] = ((HUB_ID, {}), (HUB_ID, {"revision": "refs/convert/parquet"}))
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


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
