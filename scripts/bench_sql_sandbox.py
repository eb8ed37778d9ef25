"""Queries per second of WikiSQL's execution-accuracy scoring on the full test file's size of work.

    python scripts/bench_sql_sandbox.py                      # all of wikisql/test.jsonl (15,878 questions)
    python scripts/bench_sql_sandbox.py --limit 2000 --hostile 20

The official tables are not in shared/data, so tables of the official format are synthesised
for every table id the question files name: as many columns as the questions use (at least 6,
WikiSQL's mean is about 6.4), `real` where a condition compares a number, 16 rows (its mean is
about 17) holding every condition value of the table's questions, so gold queries return rows.
Each question is scored with its gold SQL as the prediction: two queries per question (gold and
prediction), the work of a real evaluation. `--hostile N` replaces N predictions by queries that
run into the time limit (each costs timeout_s, or timeout_s + kill slack and a restart).
Prints questions, queries, wall time and queries/second as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from papeft.tasks.wikisql import WikiSQLTask  # noqa: E402

HOSTILE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def synthesise_tables(questions: Path, out: Path, seed: int = 0) -> int:
    """Write `out` ({split}.tables.jsonl) with one table per table id of `questions`; returns the count."""
    rng = random.Random(seed)
    used: dict[str, dict] = {}
    for line in questions.read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        t = used.setdefault(q["table_id"], {"n": 6, "real": set(), "values": []})
        cols = [q["sql"]["sel"]] + [c for c, _, _ in q["sql"]["conds"]]
        t["n"] = max(t["n"], max(cols) + 1)
        for c, op, v in q["sql"]["conds"]:
            if isinstance(v, (int, float)) or op > 0:
                t["real"].add(c)
            t["values"].append((c, v))
    with open(out, "w", encoding="utf-8") as fh:
        for tid, t in used.items():
            types = ["real" if c in t["real"] else "text" for c in range(t["n"])]
            rows = [[rng.randint(0, 100) if ty == "real" else f"cell {rng.randint(0, 999)}" for ty in types]
                    for _ in range(16)]
            for k, (c, v) in enumerate(t["values"]):
                rows[k % 16][c] = v if types[c] == "text" or isinstance(v, (int, float)) else rng.randint(0, 100)
            fh.write(json.dumps({"id": tid, "header": [f"Column {c}" for c in range(t["n"])],
                                 "types": types, "rows": rows}) + "\n")
    return len(used)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("PAPEFT_DATA", "../shared/data")))
    ap.add_argument("--limit", type=int, default=None, help="first N test questions (default: all)")
    ap.add_argument("--hostile", type=int, default=0, help="predictions replaced by endless queries")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "wikisql"
        root.mkdir()
        for split in ("dev", "test"):
            (root / f"{split}.jsonl").write_bytes((args.data / "wikisql" / f"{split}.jsonl").read_bytes())
            synthesise_tables(root / f"{split}.jsonl", root / f"{split}.tables.jsonl")
        task = WikiSQLTask()
        test = task.load({"split_protocol": "dev_only", "tables": "local"}, tmp).test[: args.limit]
        preds = [e.response for e in test]
        for i in random.Random(1).sample(range(len(preds)), args.hostile):
            preds[i] = HOSTILE
        start = time.perf_counter()
        verdicts = task.verdicts(preds, test)
        wall = time.perf_counter() - start
    correct = sum(v["correct"] for v in verdicts)
    print(json.dumps({"questions": len(test), "queries": 2 * len(test), "hostile": args.hostile,
                      "correct": correct, "wall_s": round(wall, 2), "queries_per_s": round(2 * len(test) / wall, 1)}))


if __name__ == "__main__":
    main()
