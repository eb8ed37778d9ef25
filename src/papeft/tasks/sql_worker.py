"""Untrusted SQL in a separate, killable process: a hard bound on time, memory and disk.

`SandboxWorker.run(table, sql)` sends the query to a worker process (`sql_sandbox.py` run as a
script) that holds the last 64 tables it was sent, each in a `TableSandbox`. What holds:

* time: the answer comes within `timeout_s + kill_slack_s` of the query being sent, whatever the
  query calls (the sandbox's progress handler stops most queries at `timeout_s`; a single
  uninterruptible call is ended by killing the worker, which is restarted for the next query,
  costing one process start, about 0.1-0.3 s);
* memory: the worker's address space is capped at `memory_mb` (RLIMIT_AS) and SQLite's heap at
  half of it; the evaluating process only ever receives results of at most `max_rows` rows and
  `max_result_chars` characters;
* disk: 0 bytes. Temporary tables stay in memory (`temp_store=MEMORY`), and the worker may not
  grow any file past 0 bytes (RLIMIT_FSIZE = 0), so a write would fail rather than land on disk
  (so would its own error output, should stderr be a file: its answers travel over pipes).

Any failure (killed, crashed, out of memory) is a `QueryResult` with an error kind; evaluation goes
on and scores it 0. POSIX only (`resource`, `select` on pipes).
"""
from __future__ import annotations

import marshal
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import sql_sandbox
from .sql_sandbox import FRAME, QueryResult, SandboxLimits

START_TIMEOUT_S = 60.0      # a worker that is not ready by then is an error of the machine, not of a query
TABLE_TIMEOUT_S = 60.0      # building a table from our own data (never untrusted text)
TIMED_OUT = object()


@dataclass(frozen=True)
class TableSpec:
    """A table to query: `key` identifies it across queries (a WikiSQL table id)."""

    key: str
    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


class SandboxWorker:
    """A worker process running `TableSandbox` queries; killed and restarted when one overruns."""

    def __init__(self, limits: SandboxLimits | None = None, max_tables: int = 64):
        self.limits, self.max_tables = limits or SandboxLimits(), max_tables
        self.proc: subprocess.Popen | None = None
        self.starts = self.kills = 0

    # ---- the process ----------------------------------------------------------
    def _start(self) -> None:
        script = Path(sql_sandbox.__file__)
        isolate = ["-P"] if sys.version_info >= (3, 11) else []   # the tasks folder stays off sys.path
        cmd = [sys.executable, *isolate, str(script), str(self.limits.memory_mb), str(self.max_tables)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     close_fds=True)
        self.starts += 1
        reply = self._receive(time.monotonic() + START_TIMEOUT_S)
        if not isinstance(reply, tuple) or reply[:1] != ("ready",):
            self._stop()
            raise RuntimeError(f"the SQL sandbox worker ({' '.join(cmd)}) did not start: {reply!r}; "
                               f"its error output is above")

    def _stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                pipe.close()
            self.proc = None

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> "SandboxWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- messages -------------------------------------------------------------
    def _send(self, message: Any) -> None:
        data = marshal.dumps(message)
        view = memoryview(FRAME.pack(len(data)) + data)
        while view:
            view = view[os.write(self.proc.stdin.fileno(), view):]

    def _receive(self, deadline: float) -> Any:
        """The next message; TIMED_OUT when it did not come by `deadline`; None when the worker died."""
        fd, buf, need = self.proc.stdout.fileno(), bytearray(), FRAME.size
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return TIMED_OUT
            chunk = os.read(fd, need - len(buf))
            if not chunk:
                return None
            buf += chunk
            if need == FRAME.size and len(buf) == need:
                need += FRAME.unpack(buf)[0]
        return marshal.loads(bytes(buf[FRAME.size:]))

    def _ask(self, message: Any, timeout_s: float) -> Any:
        """Send and wait; on no answer in time the worker is killed (TIMED_OUT), on death None."""
        try:
            self._send(message)
        except OSError:                   # BrokenPipeError: it died since the last answer
            self._stop()
            return None
        reply = self._receive(time.monotonic() + timeout_s)
        if reply is TIMED_OUT:
            self.kills += 1
        if reply is TIMED_OUT or reply is None:
            self._stop()
        return reply

    # ---- queries --------------------------------------------------------------
    def run(self, table: TableSpec, sql: str) -> QueryResult:
        """`sql` on `table` in the worker; every failure is a QueryResult with an error kind."""
        if self.proc is None or self.proc.poll() is not None:   # first query, or it died since the last
            self._stop()
            self._start()
        budget = self.limits.timeout_s + self.limits.kill_slack_s
        reply = self._ask(("run", table.key, sql), budget)
        if reply == ("missing",):
            loaded = self._ask(("table", table.key, table.name, list(table.columns), list(table.types),
                                [tuple(r) for r in table.rows], asdict(self.limits)), TABLE_TIMEOUT_S)
            if loaded != ("ok",):
                return self._result(loaded, TABLE_TIMEOUT_S)
            reply = self._ask(("run", table.key, sql), budget)
        return self._result(reply, budget)

    def _result(self, reply: Any, budget: float) -> QueryResult:
        if reply is TIMED_OUT:
            return QueryResult(None, "timeout", f"no answer within {budget:.2f} s: the SQL worker was killed "
                                                f"(it restarts for the next query)")
        if reply is None:
            return QueryResult(None, "crashed", "the SQL worker died on this query (it restarts for the next one)")
        _, rows, kind, error, canonical = reply
        return QueryResult(rows, kind, error, canonical)
