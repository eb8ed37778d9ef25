"""A sandbox for untrusted SQL: one table in a private in-memory SQLite database, read-only.

Model output is untrusted. A `TableSandbox` builds its table once, then locks the connection:

* one statement, and it must be a SELECT: sqlparse checks the text before SQLite sees it
  (defence in depth beside the authorizer); sqlite3's `execute` also refuses several statements;
* `enable_load_extension(False)`; at most 0 attached databases (`setlimit`); small limits on the
  length of any string/blob a query may build and on the SQL text itself; no sorter threads;
* `PRAGMA temp_store=MEMORY` (sorts, DISTINCT, UNION and CTE tables never spill to temp files:
  a query writes nothing to disk) and `PRAGMA query_only=ON`, both set BEFORE the authorizer is
  installed (the authorizer denies PRAGMA);
* an authorizer that allows only SELECT, reading the sandbox table (and the CTEs / sub-queries a
  SELECT defines), recursive CTEs, and a whitelist of pure SQL functions; everything else is
  denied: ATTACH/DETACH (also what `VACUUM INTO` needs), PRAGMA, CREATE/DROP/INSERT/UPDATE/DELETE,
  ALTER, transactions, `load_extension`, table-valued functions, schema tables;
* a wall-clock time limit through `set_progress_handler` (parsing, execution and fetching);
* a row limit (`fetchmany(max_rows + 1)`: more rows is a failure, never a silent cut) and a limit
  on the characters of the whole result.

The progress handler cannot interrupt one long-running function call, and in-process memory is
shared with the caller, so evaluation runs the sandboxes in a separate process
(`sql_worker.SandboxWorker`): this file, run as a script, is that process (`serve`). It caps its
own address space and SQLite's heap, may not grow any file past 0 bytes (RLIMIT_FSIZE), and the
caller kills and restarts it when an answer does not come within `timeout_s + kill_slack_s`.

`run(sql)` never raises for a bad query: it returns a `QueryResult` whose `error_kind` names what
went wrong (``denied``, ``timeout``, ``row_limit``, ``multiple_statements``, ``invalid_sql``,
``no_query``, ``memory``, ``too_big``, ...) and, for a single SELECT, its canonical form (`canonical_sql`).
"""
from __future__ import annotations

import json
import marshal
import os
import sqlite3
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO, Sequence

from sqlparse import tokens as T
from sqlparse.engine import FilterStack

SQL_TYPES = {"text": "TEXT COLLATE NOCASE", "real": "REAL"}

# Pure functions a SELECT may call (aggregates, string, numeric, date). Anything else is denied,
# e.g. load_extension, readfile/writefile/edit (CLI extensions), fts3_tokenizer, randomblob, zeroblob,
# and printf/format: SQLite's printf pads '%.*c' one character at a time, seconds past any length
# limit, inside one uninterruptible call. Every allowed function's output is capped by SQLITE_LIMIT_LENGTH.
ALLOWED_FUNCTIONS = frozenset("""
count sum total avg min max group_concat
abs coalesce ifnull iif nullif instr length lower upper ltrim rtrim trim replace round substr substring
typeof like glob char unicode hex quote sign likely unlikely likelihood
ceil ceiling floor trunc log log10 log2 ln exp power pow sqrt mod pi
date time datetime julianday strftime unixepoch
""".split())


def quote_identifier(name: str) -> str:
    """`name` as an SQLite identifier in double quotes (embedded quotes doubled)."""
    return '"' + str(name).replace('"', '""') + '"'


@dataclass(frozen=True)
class SandboxLimits:
    """How much one untrusted query may use."""

    timeout_s: float = 1.0          # wall clock per query: parsing, execution and fetching together
    max_rows: int = 10_000          # more result rows than this is a failure (kind "row_limit")
    max_sql_chars: int = 10_000     # longer SQL text is refused before SQLite sees it
    max_value_chars: int = 10_000   # SQLITE_LIMIT_LENGTH once the table is built
    max_result_chars: int = 1_000_000   # characters of all text/blob values of one result
    progress_every: int = 1_000     # SQLite VM instructions between two time checks
    kill_slack_s: float = 0.5       # the worker is killed when no answer came within timeout_s + this
    memory_mb: int = 512            # the worker's address space (RLIMIT_AS); SQLite's heap gets half


@dataclass(frozen=True)
class QueryResult:
    """The rows of one query, or why there are none (`error_kind` + `error` message)."""

    rows: tuple[tuple[Any, ...], ...] | None
    error_kind: str | None = None
    error: str | None = None
    canonical: str | None = None    # canonical_sql of the statement, when it was a single SELECT

    @property
    def ok(self) -> bool:
        return self.error_kind is None


# ---------------------------------------------------------------------------- the text: sqlparse


def _meaningful(statement: Any) -> list[Any]:
    """A statement's flat tokens without whitespace, comments and semicolons."""
    return [t for t in statement.flatten() if not (t.is_whitespace or t.ttype in T.Comment or t.value == ";")]


def single_select(sql: str) -> tuple[list[Any] | None, str | None, str | None]:
    """(the statement's meaningful tokens, None, None) when `sql` is exactly one SELECT (WITH ...
    SELECT included: the first DML keyword outside the CTEs' parentheses); else (None, kind, message).
    sqlparse only splits and tokenises here (no grouping: 4x faster, and no token-count limit)."""
    statements = [tokens for tokens in map(_meaningful, FilterStack().run(sql)) if tokens]
    if not statements:
        return None, "no_query", "the SQL text holds no statement"
    if len(statements) > 1:
        return None, "multiple_statements", f"{len(statements)} statements; only a single SELECT is accepted"
    tokens = statements[0]
    verb = tokens[0]
    if verb.ttype in T.Keyword.CTE:
        depth = 0
        for tok in tokens[1:]:
            depth += (tok.value == "(") - (tok.value == ")")
            if depth == 0 and tok.ttype in T.Keyword.DML:
                verb = tok
                break
    if verb.ttype not in T.Keyword.DML or verb.normalized != "SELECT":
        return None, "denied", f"a statement starting {verb.value.upper()!r}; only a single SELECT is accepted"
    return tokens, None, None


def _canonical_token(token: Any) -> tuple[str, str]:
    """One token as (class, text): words and identifiers unquoted and lower case, strings lower case,
    numbers as floats, == and <> as = and !=."""
    value, kind = token.value, token.ttype
    if kind in T.Literal.String.Single:
        return "s", value[1:-1].replace("''", "'").lower()
    if kind in T.Literal.Number:
        try:
            return "n", repr(float(value))
        except ValueError:
            return "n", value.lower()
    if kind in T.Literal.String.Symbol or (kind in T.Name and value[:1] in "`[\""):
        return "w", value[1:-1].replace(value[0] * 2, value[0]).lower()
    if kind in T.Keyword or kind in T.Name:
        return "w", value.lower()
    if kind in T.Operator.Comparison:
        return "o", {"==": "=", "<>": "!="}.get(value, value)
    return "p", value.lower()


def _conditions(tokens: list[tuple[str, str]]) -> list[tuple[tuple[str, str], ...]] | None:
    """A WHERE clause's tokens split at its top-level ANDs (an AND closing a BETWEEN stays inside);
    None when the clause has a top-level OR (then the order is kept)."""
    parts: list[list[tuple[str, str]]] = [[]]
    depth, between = 0, False
    for tok in tokens:
        depth += (tok == ("p", "(")) - (tok == ("p", ")"))
        if depth == 0 and tok == ("w", "or"):
            return None
        if depth == 0 and tok == ("w", "between"):
            between = True
        if depth == 0 and tok == ("w", "and") and not between:
            parts.append([])
            continue
        between = between and tok != ("w", "and")
        parts[-1].append(tok)
    return [tuple(p) for p in parts]


def canonical_sql(statement: Sequence[Any]) -> str:
    """A canonical form of one SELECT's tokens (`single_select`; our reading of WikiSQL's logical
    form): tokens as `_canonical_token`, and the conditions the WHERE clause joins with top-level
    ANDs as a set (the official logical-form accuracy compares conditions order-free)."""
    tokens = [_canonical_token(t) for t in statement]
    if ("w", "where") in tokens:
        start = tokens.index(("w", "where")) + 1
        end = next((i for i in range(start, len(tokens)) if tokens[i] in
                    {("w", "group"), ("w", "order"), ("w", "limit"), ("w", "having")}), len(tokens))
        conds = _conditions(tokens[start:end])
        if conds is not None:
            joined = [tok for c in sorted(conds) for tok in (("w", "and"), *c)][1:]
            tokens = tokens[:start] + joined + tokens[end:]
    return json.dumps(tokens, ensure_ascii=False)


# ---------------------------------------------------------------------------- the database


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
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_WORKER_THREADS, 0)
        self.conn.execute("PRAGMA temp_store=MEMORY")
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
        try:
            statement, kind, message = single_select(sql)
            canonical = canonical_sql(statement) if statement is not None else None
        except Exception as exc:  # noqa: BLE001  (a text sqlparse cannot take is no query of ours)
            return QueryResult(None, "invalid_sql", f"sqlparse: {type(exc).__name__}: {exc}")
        if statement is None:
            return QueryResult(None, kind, message)
        if time.monotonic() > self._deadline:
            return QueryResult(None, "timeout", "parsing took the whole time limit", canonical)
        self.conn.set_progress_handler(self._progress, self.limits.progress_every)
        cursor = None
        try:
            cursor = self.conn.execute(sql)
            if cursor.description is None:  # defence in depth: the text check lets no such statement by
                return QueryResult(None, "no_query", "the SQL text holds no statement that returns rows", canonical)
            rows = cursor.fetchmany(self.limits.max_rows + 1)
        except Exception as exc:  # noqa: BLE001  (untrusted input: every failure is a result)
            return QueryResult(None, classify_error(exc), f"{type(exc).__name__}: {exc}", canonical)
        finally:
            self.conn.set_progress_handler(None, 0)
            if cursor is not None:
                cursor.close()
        if len(rows) > self.limits.max_rows:
            return QueryResult(None, "row_limit", f"more than {self.limits.max_rows} rows", canonical)
        chars = sum(len(v) for row in rows for v in row if isinstance(v, (str, bytes)))
        if chars > self.limits.max_result_chars:
            return QueryResult(None, "too_big", f"{chars} characters in the result > {self.limits.max_result_chars}",
                               canonical)
        return QueryResult(tuple(tuple(r) for r in rows), canonical=canonical)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "TableSandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def classify_error(exc: BaseException) -> str:
    """A short kind for a failed query (recorded in prediction rows)."""
    if isinstance(exc, MemoryError):        # SQLITE_NOMEM: the heap limit was reached
        return "memory"
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


# ---------------------------------------------------------------------------- the worker process

FRAME = struct.Struct(">I")   # every message: its length, then marshal bytes (str, bytes, numbers, tuples)


def send(stream: BinaryIO, message: Any) -> None:
    data = marshal.dumps(message)
    stream.write(FRAME.pack(len(data)) + data)
    stream.flush()


def receive(stream: BinaryIO) -> Any | None:
    """The next message, or None at the end of the stream."""
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    size = FRAME.unpack(head)[0]
    data = stream.read(size)
    return marshal.loads(data) if len(data) == size else None


def confine(memory_mb: int) -> None:
    """This process may not grow any file past 0 bytes nor use more than `memory_mb` of address
    space; SQLite's heap (all connections) stops at half of it with an out-of-memory error."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    cap = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sqlite3.connect(":memory:").execute(f"PRAGMA hard_heap_limit={cap // 2}").close()


def serve(memory_mb: int, max_tables: int = 64, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    """The worker's loop. Messages in: ("table", key, name, columns, types, rows, limits as a dict) and
    ("run", key, sql). Out: ("ready", pid) once, then per message ("ok",) | ("missing",) when `key`
    is not loaded (the last `max_tables` tables are kept) | ("result", rows, kind, error, canonical)."""
    stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
    confine(memory_mb)
    boxes: OrderedDict[str, TableSandbox] = OrderedDict()
    send(stdout, ("ready", os.getpid()))
    while (message := receive(stdin)) is not None:
        if message[0] == "table":
            _, key, name, columns, types, rows, limits = message
            if key in boxes:
                boxes.pop(key).close()
            try:
                boxes[key] = TableSandbox(name, columns, types, rows, SandboxLimits(**limits))
            except Exception as exc:  # noqa: BLE001  (reported to the caller, who records it)
                send(stdout, ("result", None, "table", f"{type(exc).__name__}: {exc}", None))
                continue
            while len(boxes) > max_tables:
                boxes.popitem(last=False)[1].close()
            send(stdout, ("ok",))
        elif message[0] == "run" and message[1] in boxes:
            boxes.move_to_end(message[1])
            r = boxes[message[1]].run(message[2])
            send(stdout, ("result", r.rows, r.error_kind, r.error, r.canonical))
        else:
            send(stdout, ("missing",))


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
