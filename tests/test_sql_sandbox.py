"""The SQL sandbox under hostile queries: a hard time bound (a killable worker), 0 bytes on disk, a
memory cap, functions that build huge values denied or capped, sqlparse's single-SELECT check, and
WikiSQL's logical-form accuracy."""
import os
import time
from pathlib import Path

import pytest

from papeft.tasks.sql_sandbox import SandboxLimits, TableSandbox
from papeft.tasks.sql_worker import SandboxWorker, TableSpec
from papeft.tasks.wikisql import WikiSQLTask

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROWS = [[str(i), i] for i in range(30)]
SPEC = TableSpec("numbers", "t", ("name", "n"), ("text", "real"), tuple(tuple(r) for r in ROWS))
LONG = "'" + "a" * 4000 + "'"             # twice in one query's text still fits in max_sql_chars
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
SPILLING = [  # sorts, UNION and DISTINCT over long rows: SQLite spills them to temp files unless told otherwise
    f"WITH RECURSIVE c(x, s) AS (SELECT 1, {LONG} UNION ALL SELECT x + 1, s FROM c LIMIT 100000) "
    "SELECT x FROM c ORDER BY s || x LIMIT 1",
    f"WITH RECURSIVE c(x, s) AS (SELECT 1, {LONG} UNION SELECT x + 1, s FROM c) SELECT count(*) FROM c",
    f"WITH RECURSIVE c(x, s) AS (SELECT 1, {LONG} UNION ALL SELECT x + 1, s FROM c) "
    "SELECT count(DISTINCT s || x) FROM c"]


def proc_io(pid="self") -> int:
    """Bytes this process passed to write(2) so far (files, pipes: everything)."""
    path = Path(f"/proc/{pid}/io")
    if not path.exists():
        pytest.skip("needs /proc/<pid>/io (Linux)")
    return int(next(line for line in path.read_text().splitlines() if line.startswith("wchar")).split()[1])


def proc_status(pid: int, key: str) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith(key)).split()[1])


def test_functions_that_build_huge_values_are_denied_or_capped_fast():
    with TableSandbox("t", ["name", "n"], ["text", "real"], ROWS, SandboxLimits(timeout_s=0.5)) as box:
        cases = {"SELECT printf('%.*c', 1000000000, 'x')": "denied",      # 1.5-3 s in one uninterruptible call
                 "SELECT format('%.*c', 1000000000, 'x')": "denied",
                 f"SELECT replace({LONG}, 'a', {LONG})": "too_big",
                 f"SELECT hex(hex({LONG}))": "too_big",
                 f"SELECT group_concat({LONG}) FROM t": "too_big",
                 "SELECT zeroblob(1000000000)": "denied", "SELECT randomblob(1000000000)": "denied",
                 f"SELECT substr({LONG}, 1, 1000000000) = {LONG}": None}
        for sql, kind in cases.items():
            start = time.monotonic()
            assert box.run(sql).error_kind == kind, sql[:60]
            assert time.monotonic() - start < 0.5, sql[:60]


def test_spilling_queries_write_nothing_to_disk():
    with TableSandbox("t", ["name", "n"], ["text", "real"], ROWS, SandboxLimits(timeout_s=0.5)) as box:
        for sql in SPILLING:
            before = proc_io()
            assert box.run(sql).error_kind in ("timeout", None), sql[:60]
            assert proc_io() - before == 0, sql[:60]                  # 60-150 MB of temp files before the fix


def test_worker_kills_a_query_that_overruns_and_restarts():
    # the progress handler never fires here, as in one long function call: only the kill can stop it
    limits = SandboxLimits(timeout_s=0.2, kill_slack_s=0.3, progress_every=10**9)
    with SandboxWorker(limits) as worker:
        assert worker.run(SPEC, "SELECT count(*), sum(n) FROM t").rows == ((30, 435.0),)
        first = worker.proc.pid
        for _ in range(2):
            start = time.monotonic()
            result = worker.run(SPEC, ENDLESS)
            assert result.error_kind == "timeout" and "killed" in result.error
            assert time.monotonic() - start < 0.2 + 0.3 + 0.5      # limit + stated slack (+ a busy machine)
        assert worker.kills == 2 and worker.proc is None
        assert worker.run(SPEC, "SELECT name FROM t WHERE n = 3").rows == (("3",),)   # a fresh worker
        assert worker.proc.pid != first and worker.starts == 3
        assert not os.path.exists(f"/proc/{first}")


def test_worker_is_confined_no_disk_and_a_memory_cap():
    with SandboxWorker(SandboxLimits(timeout_s=10.0, memory_mb=128)) as worker:
        worker.run(SPEC, "SELECT 1")
        pid = worker.proc.pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max file size             0" in limits
        assert f"Max address space         {128 << 20}" in limits
        before = proc_io(pid)
        start = time.monotonic()
        result = worker.run(SPEC, SPILLING[1])                    # grows without bound in memory
        assert result.error_kind == "memory" and time.monotonic() - start < 10.0
        assert proc_io(pid) - before < 64_000                     # its answers only: nothing went to a file
        assert proc_status(pid, "VmHWM") < 128 << 10              # peak resident set (kB) under the cap
        assert worker.run(SPEC, "SELECT count(*) FROM t").rows == ((30,),)


def test_only_a_single_select_reaches_sqlite_even_without_the_authorizer():
    with TableSandbox("t", ["name", "n"], ["text", "real"], ROWS) as box:
        box.conn.set_authorizer(None)                             # the text check alone must hold
        for sql in ("PRAGMA query_only=OFF", "DELETE FROM t", "INSERT INTO t VALUES ('x', 1)",
                    "WITH a AS (SELECT 1) DELETE FROM t", "UPDATE t SET n = 0", "DROP TABLE t",
                    "ATTACH ':memory:' AS x", "VALUES (1)", "EXPLAIN SELECT 1", "SELECT 1; DELETE FROM t"):
            result = box.run(sql)
            assert result.error_kind in ("denied", "multiple_statements"), sql
            assert "single SELECT" in result.error, sql
        assert box.run("SELECT count(*), sum(n) FROM t").rows == ((30, 435.0),)
        assert box.run("WITH c AS (SELECT n FROM t) SELECT max(n) FROM c; -- done").rows == ((29.0,),)


def test_logical_form_accuracy_beside_execution_accuracy():
    task = WikiSQLTask()
    splits = task.load({"split_protocol": "dev_only"}, str(FIXTURES))
    ex = next(e for e in splits.train + splits.dev + splits.test if "more than 100" in e.prompt)
    assert ex.response == 'SELECT "Team" FROM t WHERE "Points" > 100 AND "Season" = 2001'
    preds = [ex.response,
             "select team from T where season = 2001.0 and \"points\">100;",      # same form, written otherwise
             'SELECT "Team" FROM t WHERE "Points" > 100 AND "Season" = 2001 AND 1 = 1',  # same rows, other form
             'SELECT "Team" FROM t WHERE "Points" > 100 OR "Season" = 2001',
             "DROP TABLE t"]
    result = task.evaluate(lambda prompts: preds, [ex] * len(preds))
    assert [r["correct"] for r in result.rows][:3] == [True, True, True]
    assert [r["lf_match"] for r in result.rows] == [True, True, False, False, False]
    assert result.metrics["logical_form_accuracy"] == pytest.approx(100 * 2 / 5)
