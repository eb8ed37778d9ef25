"""A sandbox for untrusted SQL: one table in a private in-memory SQLite database, read-only.

Model output is untrusted. A `TableSandbox` builds its table once, then locks the connection:

* `enable_load_extension(False)`; at most 0 attached databases (`setlimit`); small limits on the
  length of any string/blob a query may build and on the SQL text itself;
* `PRAGMA query_only=ON`, set BEFORE the authorizer is installed (the authorizer denies PRAGMA);
* an authorizer that allows only SELECT, reading the sandbox table (and the CTEs / sub-queries a
  SELECT defines), recursive CTEs, and a whitelist of pure SQL functions; everything else is
  denied: ATTACH/DETACH (also what `VACUUM INTO` needs), PRAGMA, CREATE/DROP/INSERT/UPDATE/DELETE,
  ALTER, transactions, `load_extension`, table-valued functions, schema tables;
* a wall-clock time limit through `set_progress_handler` (covers both execution and fetching);
* a row limit (`fetchmany(max_rows + 1)`: more rows is a failure, never a silent cut);
* one statement only (sqlite3's `execute` refuses several; the failure kind says so).

`run(sql)` never raises for a bad query: it returns a `QueryResult` whose `error_kind` names what
went wrong (``denied``, ``timeout``, ``row_limit``, ``multiple_statements``, ``invalid_sql``, ``no_query``, ...).
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Sequence

SQL_TYPES = {"text": "TEXT COLLATE NOCASE", "real": "REAL"}

# Pure functions a SELECT may call (aggregates, string, numeric, date). Anything else is denied,
# e.g. load_extension, readfile/writefile/edit (CLI extensions), fts3_tokenizer, randomblob, zeroblob.
ALLOWED_FUNCTIONS = frozenset("""
count sum total avg min max group_concat
abs coalesce ifnull iif nullif instr length lower upper ltrim rtrim trim replace round substr substring
typeof like glob printf format char unicode hex quote sign likely unlikely likelihood
ceil ceiling floor trunc log log10 log2 ln exp power pow sqrt mod pi
date time datetime julianday strftime unixepoch
""".split())


def quote_identifier(name: str) -> str:
    """`name` as an SQLite identifier in double quotes (embedded quotes doubled)."""
    return '"' + str(name).replace('"', '""') + '"'


@dataclass(frozen=True)
class SandboxLimits:
    """How much one untrusted query may use."""

    timeout_s: float = 1.0          # wall clock per query, execution and fetching together
    max_rows: int = 10_000          # more result rows than this is a failure (kind "row_limit")
    max_sql_chars: int = 10_000     # longer SQL text is refused before SQLite sees it
    max_value_chars: int = 10_000   # SQLITE_LIMIT_LENGTH once the table is built
    progress_every: int = 1_000     # SQLite VM instructions between two time checks


@dataclass(frozen=True)
class QueryResult:
    """The rows of one query, or why there are none (`error_kind` + `error` message)."""

    rows: tuple[tuple[Any, ...], ...] | None
    error_kind: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None


class TableSandbox:
    """One table `name(columns)` of `types` ("text" | "real") filled with `rows`, queryable read-only."""

    def __init__(self, name: str, columns: Sequence[str], types: Sequence[str],
                 rows: Sequence[Sequence[Any]], limits: SandboxLimits | None = None):
        if len(columns) != len(types):
            raise ValueError(f"{len(columns)} columns but {len(types)} types")
        unknown = sorted({t for t in types if t not in SQL_TYPES})
        if unknown:
            raise ValueError(f"column types {unknown} are not among {sorted(SQL_TYPES)}")
        self.name, self.limits = name, limits or SandboxLimits()
        self._deadline = 0.0
        self.conn = sqlite3.connect(":memory:", isolation_level=None)  # autocommit: no implicit BEGIN
        if hasattr(self.conn, "enable_load_extension"):  # absent when sqlite3 is built without it
            self.conn.enable_load_extension(False)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self._build(columns, types, rows)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limits.max_value_chars)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, self.limits.max_sql_chars)
        self.conn.execute("PRAGMA query_only=ON")       # before the authorizer, which denies PRAGMA
        self.conn.set_authorizer(self._authorize)

    def _build(self, columns: Sequence[str], types: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        spec = ", ".join(f"{quote_identifier(c)} {SQL_TYPES[t]}" for c, t in zip(columns, types))
        self.conn.execute(f"CREATE TABLE {quote_identifier(self.name)} ({spec})")
        marks = ", ".join("?" * len(columns))
        with self.conn:
            self.conn.executemany(f"INSERT INTO {quote_identifier(self.name)} VALUES ({marks})",
                                  [tuple(row) for row in rows])

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None,
                   _trigger: str | None) -> int:
        """Allow SELECT, reads of our table or of a CTE (db None), recursion, whitelisted functions."""
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            ours = (arg1 or "").lower() == self.name.lower()
            return sqlite3.SQLITE_OK if ours or db is None else sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in ALLOWED_FUNCTIONS:
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY

    def _progress(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0   # non-zero interrupts the query

    def run(self, sql: str) -> QueryResult:
        """Execute one untrusted SELECT; any failure comes back as a `QueryResult` with an error kind."""
        if not isinstance(sql, str) or not sql.strip():
            return QueryResult(None, "empty", "no SQL text")
        if len(sql) > self.limits.max_sql_chars:
            return QueryResult(None, "too_long", f"{len(sql)} characters > {self.limits.max_sql_chars}")
        self._deadline = time.monotonic() + self.limits.timeout_s
        self.conn.set_progress_handler(self._progress, self.limits.progress_every)
        cursor = None
        try:
            cursor = self.conn.execute(sql)
            if cursor.description is None:  # no statement at all ("-- x", ";"): not an empty result
                return QueryResult(None, "no_query", "the SQL text holds no statement that returns rows")
            rows = cursor.fetchmany(self.limits.max_rows + 1)
        except Exception as exc:  # noqa: BLE001  (untrusted input: every failure is a result)
            return QueryResult(None, classify_error(exc), f"{type(exc).__name__}: {exc}")
        finally:
            self.conn.set_progress_handler(None, 0)
            if cursor is not None:
                cursor.close()
        if len(rows) > self.limits.max_rows:
            return QueryResult(None, "row_limit", f"more than {self.limits.max_rows} rows")
        return QueryResult(tuple(tuple(r) for r in rows))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "TableSandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def classify_error(exc: BaseException) -> str:
    """A short kind for a failed query (recorded in prediction rows)."""
    text = str(exc).lower()
    if any(word in text for word in ("authoriz", "prohibited", "readonly", "query_only")):
        return "denied"
    if "interrupted" in text:
        return "timeout"
    if "one statement at a time" in text:
        return "multiple_statements"
    if "too big" in text or "too long" in text:
        return "too_big"
    if isinstance(exc, (sqlite3.OperationalError, sqlite3.ProgrammingError, sqlite3.Warning)):
        return "invalid_sql"
    return "error"


def normalise_cell(value: Any) -> Any:
    """Numbers compare as floats rounded to 6 decimals (3 == 3.0, 0.1+0.2 == 0.3); the rest as is."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return round(float(value), 6)
    return value


def same_result(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]]) -> bool:
    """Whether two results hold the same rows as multisets (order-free, duplicates counted; our reading)."""
    if len(a) != len(b):
        return False

    def key(row: Sequence[Any]) -> tuple[str, ...]:
        return tuple(repr(normalise_cell(v)) for v in row)   # repr: None, str and float never collide

    return sorted(map(key, a)) == sorted(map(key, b))
