"""Commit each finished cell of a sweep as it finishes, so a new machine loses at most the cell in flight.

    python scripts/commit_cells.py results/cpu_table1/runs --every 300 &     # beside the sweep
    python scripts/commit_cells.py results/cpu_table1/runs --once             # what is finished now

A cell is finished when its metrics.json says "complete" (or it wrote failed.json); its small files
(metrics.json, config.yaml, predictions.jsonl, failed.json) are committed with
`git commit --only`, so whatever else is staged stays staged and nothing else is committed.
Adapters and checkpoints are never committed (.gitignore keeps them out). The sweep's resume
(`resume: auto`) skips a committed cell whose config hash matches, on any machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SMALL_FILES = ("metrics.json", "config.yaml", "predictions.jsonl", "failed.json")


def finished_cells(root: Path) -> list[Path]:
    cells = set()
    for path in root.rglob("metrics.json"):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("status") == "complete":
                cells.add(path.parent)
        except (OSError, ValueError):
            continue                                     # being written (atomically) or broken: next round
    cells.update(p.parent for p in root.rglob("failed.json"))
    return sorted(cells)


def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=check)


def commit_finished(root: Path) -> int:
    """Commit the small files of finished cells that are new or changed; returns how many cells."""
    files = [str(cell / name) for cell in finished_cells(root) for name in SMALL_FILES if (cell / name).is_file()]
    if not files:
        return 0
    changed = git("status", "--porcelain", "--untracked-files=all", "--", *files).stdout.splitlines()
    paths = [line[3:] for line in changed]
    if not paths:
        return 0
    cells = sorted({str(Path(p).parent) for p in paths})
    git("add", "--", *paths)
    message = f"{root}: {len(cells)} finished cell{'s' * (len(cells) > 1)}\n\n" + "\n".join(cells)
    done = git("commit", "--only", "-m", message, "--", *paths, check=False)
    if done.returncode != 0:                             # e.g. another commit held the index lock: next round
        print(f"commit_cells: commit failed, retrying next round: {done.stderr.strip()}", file=sys.stderr)
        return 0
    return len(cells)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path, help="a sweep's runs folder, e.g. results/cpu_table1/runs")
    ap.add_argument("--every", type=float, default=300.0, help="seconds between looks (default 300)")
    ap.add_argument("--once", action="store_true", help="commit what is finished now and exit")
    args = ap.parse_args(argv)
    while True:
        if args.root.is_dir():
            n = commit_finished(args.root)
            if n:
                print(f"commit_cells: committed {n} cell(s) under {args.root} at {time.strftime('%H:%M:%S')}", flush=True)
        if args.once:
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    raise SystemExit(main())
