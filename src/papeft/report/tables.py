"""Median tables (Markdown, CSV, LaTeX) and figures over the run directories of a sweep.

Rows are (backbone, method), columns are tasks, and each cell is the median score over
seeds with its interquartile range. Only ``metrics.json`` records with ``"status": "complete"``
count; unreadable files, and files with any malformed field the report reads, are skipped with
a warning naming the file (never an abort). Runs that wrote ``failed.json`` are listed and flag
their cell (a cell with only failures reads ``failed``), never as a number. A complete run whose
score is NaN keeps its row: the cell reads ``NaN`` when no seed has a score (else the median of
the others, flagged), and the table lists each such run with why.
Rendering: papeft.report.formats; figures: papeft.report.plots.

CLI: ``python -m papeft.report <dir> [--out OUTDIR] [--name median] [--paper table1] [--plots] [--no-iqr]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from papeft.io import write_text
from papeft.report.formats import to_csv, to_latex, to_markdown
from papeft.report.provenance import short_commit
from papeft.report.reproduction import (group_runs, majority_scores, off_label_line, protocol_lines, task_notes,
                                        write_reproduction)
from papeft.report.rows import FLOOR_METHODS, MAJORITY, Cell, Row, floors, quantile

REQUIRED = ("backbone", "method", "task", "seed", "metric", "score",
            "params_trainable_no_bias", "status")
FAILURE_KEYS = ("backbone", "method", "task", "seed")


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


def _key_problem(rec: object, keys: Sequence[str]) -> str | None:
    """Why `rec` cannot be grouped: not an object, a missing key, a name that is not text, a seed
    that is not an integer."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [k for k in keys if k not in rec]
    if missing:
        return f"missing keys {missing}"
    names = [k for k in ("backbone", "method", "task", "metric", "status") if k in keys
             and (not isinstance(rec[k], str) or not rec[k])]
    if names:
        return f"field {names[0]!r} is {rec[names[0]]!r}, not a non-empty string"
    if not _integer(rec["seed"]):
        return f"field 'seed' is {rec['seed']!r}, not an integer"
    return None


def _problem(rec: object) -> str | None:
    """Why a record cannot be counted (None when it is well formed): every field the report reads is checked."""
    why = _key_problem(rec, REQUIRED)
    if why:
        return why
    score = rec["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isinf(score):
        return f"field 'score' is {score!r}, not a number (NaN is kept as a run without a score)"
    if not _integer(rec["params_trainable_no_bias"]) or rec["params_trainable_no_bias"] < 0:
        return f"field 'params_trainable_no_bias' is {rec['params_trainable_no_bias']!r}, not a count"
    for key, ok in (("notes", _strings), ("artifacts", lambda v: isinstance(v, list) and _strings(v)),
                    ("metrics", lambda v: isinstance(v, dict))):
        if rec.get(key) is not None and not ok(rec[key]):
            return f"field {key!r} is {rec[key]!r}"
    return None


def unscored_line(rec: dict) -> str:
    """Why a complete run has no score: its metric is NaN, with the counts that usually explain it."""
    extra = rec.get("metrics") or {}
    hints = [f"{k}={v:g}" for k, v in sorted(extra.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)
             and any(word in k for word in ("missing", "judged", "error", "failed"))]
    return (f"{rec['backbone']} / {rec['method']} / {rec['task']} / seed {rec['seed']}: {rec['metric']} is NaN"
            + (f" ({', '.join(hints[:4])})" if hints else "") + f": no test example could be scored; "
            f"see {rec.get('_source', 'its metrics.json')}")


def _usable(rec: dict, source: str) -> bool:
    """True for a well-formed complete record; warns about malformed ones."""
    if isinstance(rec, dict) and "status" in rec and rec["status"] != "complete":
        return False  # unfinished run: silently not counted
    why = _problem(rec)
    if why:
        warnings.warn(f"skipping {source}: {why}", stacklevel=3)
        return False
    return True


def collect(root: str | Path) -> list[dict]:
    """Load every complete, well-formed ``metrics.json`` under ``root`` (recursively).

    Each returned record gains a ``_source`` key (the file path).
    """
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("metrics.json"))
    records = []
    for path in files:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping {path}: cannot parse ({exc})", stacklevel=2)
            continue
        if _usable(rec, str(path)):
            records.append({**rec, "_source": str(path)})
    return records


def collect_failures(root: str | Path) -> list[dict]:
    """Every ``failed.json`` under ``root`` (runs that raised; papeft.runner.cells writes them)."""
    root = Path(root)
    if root.is_file():
        return []
    out = []
    for path in sorted(root.rglob("failed.json")):
        rec = read_json(path)
        why = "unreadable" if rec is None else _key_problem(rec, FAILURE_KEYS)
        if why is None:
            out.append({**rec, "_source": str(path)})
        else:
            warnings.warn(f"skipping {path}: not a failure record ({why})", stacklevel=2)
    return out


def _key(rec: dict) -> tuple:
    return (str(rec["backbone"]), str(rec["method"]), str(rec["task"]), rec["seed"])


def _dedupe(records: list[dict]) -> list[dict]:
    """Keep one record per (backbone, method, task, seed): the last by file path, so that a table
    regenerates the same from any checkout (file times are not kept by git); each duplicate is warned,
    with both config hashes when they differ (two protocols mixed in one folder)."""
    best: dict[tuple, tuple[tuple[str, int], dict]] = {}
    for i, rec in enumerate(records):
        key = _key(rec)
        rank = (str(rec.get("_source", "")), i)
        if key in best:
            old = best[key][1]
            keep = rec if rank > best[key][0] else old
            drop = old if keep is rec else rec
            hashes = {str(r.get("config_hash")) for r in (keep, drop)}
            differ = f" (different configs: {', '.join(sorted(hashes))})" if len(hashes) > 1 else ""
            warnings.warn(f"duplicate run {key}: keeping {keep.get('_source', '<dict>')}, "
                          f"ignoring {drop.get('_source', '<dict>')}{differ}", stacklevel=3)
            if keep is old:
                continue
        best[key] = (rank, rec)
    return [rec for _, rec in best.values()]


def usable_records(records: Iterable[dict]) -> list[dict]:
    """The complete, well-formed records (a warning names each other one), one per (backbone, method,
    task, seed): the last by file path."""
    return _dedupe([r for r in records
                    if _usable(r, str(r.get("_source", "<dict>")) if isinstance(r, dict) else "<record>")])


def median_table(records: Iterable[dict], failures: Iterable[dict] = (), order: Sequence[str] = ()) -> list[Row]:
    """Group complete records (and failed runs without a complete twin) into rows, sorted by
    (backbone, position of the method in `order`, method)."""
    good = usable_records(records)
    rows: dict[tuple[str, str], Row] = {}
    for rec in good:
        key = (str(rec["backbone"]), str(rec["method"]))
        row = rows.setdefault(key, Row(*key))
        row.params.append(int(rec["params_trainable_no_bias"]))
        cell = row.cells.setdefault(str(rec["task"]), Cell(str(rec["metric"]), []))
        if cell.metric is None:
            cell.metric = str(rec["metric"])
        elif str(rec["metric"]) != cell.metric:
            warnings.warn(f"task {rec['task']!r} reports metrics {cell.metric!r} and "
                          f"{rec['metric']!r}; using {cell.metric!r}", stacklevel=2)
        if math.isnan(rec["score"]):
            cell.unscored.append(unscored_line(rec))
        else:
            cell.scores.append(float(rec["score"]))
    done = {_key(r) for r in good}
    for fail in failures:
        if _key(fail) in done:
            continue
        key = (str(fail["backbone"]), str(fail["method"]))
        row = rows.setdefault(key, Row(*key))
        row.cells.setdefault(str(fail["task"]), Cell(None, [])).failed += 1
    for (backbone, task), (metric, score) in majority_scores(good).items():
        rows.setdefault((backbone, MAJORITY), Row(backbone, MAJORITY, [0])).cells[task] = Cell(metric, [score])
    rank = {m: i for i, m in enumerate([*FLOOR_METHODS, *order])}
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], rank.get(k[1], len(rank)), k[1]))]


def collect_notes(records: Iterable[dict]) -> list[str]:
    """Union of the ``notes`` of complete records, in first-seen order, each led by its task(s) unless it
    holds for every task of the records."""
    good = [r for r in records if isinstance(r, dict) and r.get("status") == "complete" and not _problem(r)]
    pairs = [(str(r["task"]), str(note)) for r in good
             for note in ([r.get("notes")] if isinstance(r.get("notes"), str) else r.get("notes") or [])]
    return task_notes(pairs, [str(r["task"]) for r in good])


def code_note(records: Iterable[dict]) -> str:
    """The caption line naming the commit(s) of the project that produced the tabulated runs."""
    counts: dict[str, int] = {}
    for rec in records:
        if isinstance(rec, dict) and rec.get("status") == "complete" and not _problem(rec):
            env = rec.get("environment")
            key = short_commit(env if isinstance(env, dict) else None) or "unknown (run predates provenance)"
            counts[key] = counts.get(key, 0) + 1
    if len(counts) == 1:
        return f"Code: papeft commit {next(iter(counts))}."
    parts = [f"{c} ({n} run{'s' if n > 1 else ''})" for c, n in sorted(counts.items())]
    return "Code: papeft commits " + ", ".join(parts) + "."


def method_family(rec: dict) -> str:
    """The method a budget sweep varies: `parade_r24` -> `parade` (names without `_r<N>` stay)."""
    return re.sub(r"_r\d+$", "", str(rec["method"]))


def budget_series(records: Iterable[dict]) -> dict[str, dict[str, list[tuple[int, float, float, float]]]]:
    """task -> method family -> [(tunable params, median, q25, q75)] sorted by params; only
    families with at least two budgets (Figure 2: score against tunable parameters)."""
    groups: dict[tuple, list[float]] = {}
    for rec in usable_records(records):
        if math.isnan(rec["score"]):
            continue
        key = (str(rec["task"]), method_family(rec), int(rec["params_trainable_no_bias"]))
        groups.setdefault(key, []).append(float(rec["score"]))
    out: dict[str, dict[str, list]] = {}
    for (task, family, params), scores in sorted(groups.items()):
        out.setdefault(task, {}).setdefault(family, []).append(
            (params, statistics.median(scores), quantile(scores, 0.25), quantile(scores, 0.75)))
    return {t: {f: pts for f, pts in fams.items() if len(pts) > 1} for t, fams in out.items()
            if any(len(pts) > 1 for pts in fams.values())}


def write_tables(run_dirs_or_metrics: Sequence[Path | str | dict], out_stem: Path | str,
                 paper: str | None = None, iqr: bool = True, reference: str | None = None,
                 claims_from: Path | None = None, command: str | None = None) -> dict[str, Path]:
    """Write ``<out_stem>.md/.csv/.tex`` (atomically) from run dirs, metrics files or dicts.

    Directories are scanned recursively for ``metrics.json`` and ``failed.json``. `paper` names a
    table of papeft.report.paper_numbers printed under ours. `reference` (a method) adds the
    interval and paired-difference tables (papeft.report.reproduction); `claims_from` (the folder of
    the committed benchmarks) the claims table (papeft.report.claims); `command`, the command line that
    made the tables, goes into their notes. Raises ``ValueError`` when there is no run.
    """
    from papeft.report.paper_numbers import get_table
    records: list[dict] = []
    failures: list[dict] = []
    for item in run_dirs_or_metrics:
        if isinstance(item, dict):
            records.append(item)
        else:
            records += collect(item)
            failures += collect_failures(item)
    table = get_table(paper) if paper else None
    good = usable_records(records)               # deduped once: each duplicate is named once
    rows = median_table(good, failures, order=[r.method for r in table.rows] if table else ())
    if not rows:
        raise ValueError("no complete or failed runs to tabulate")
    done = {_key(r) for r in good}
    failures = [f for f in failures if _key(f) not in done]
    notes = [code_note(good)] + protocol_lines(good) + collect_notes(good) + off_label_line(good)
    if command:
        notes.append(f"Regenerate: {command}")
    stem = Path(out_stem)
    texts = {"md": to_markdown(rows, notes, table, failures, iqr), "csv": to_csv(rows, table),
             "tex": to_latex(rows, notes, table, iqr, failures)}
    paths = {}
    for ext, text in texts.items():
        paths[ext] = stem.with_name(f"{stem.name}.{ext}")
        write_text(paths[ext], text)
    if reference is not None:
        paths.update(write_reproduction(good, stem, reference, [r.method for r in rows], notes))
    if claims_from is not None:
        from papeft.report.claims import write_claims
        paths.update(write_claims(floors(rows), group_runs(good), Path(claims_from), stem, notes))
    return paths


def write_plots(root: Path, out_dir: Path) -> list[Path]:
    """Figure 2 (score against tunable parameters, one panel per task) as PNG and PDF, plus an
    index linking every per-run figure (PEDRO's learned activations) found in the runs' artifacts."""
    from papeft.report.plots import plot_budget, plot_methods_budget
    records = usable_records(collect(root))          # deduped once: each duplicate is named once
    written: list[Path] = []
    for task, series in budget_series(records).items():
        metric = next(r["metric"] for r in records if r["task"] == task)
        written += plot_budget(series, out_dir / f"budget-{task}", title=f"{task}: score against tunable parameters",
                               ylabel=metric)
    table = median_table(records)
    panels = {task: {row.method: (max(row.params), c.median, quantile(c.scores, 0.25), quantile(c.scores, 0.75))
                     for row in table if not row.floor and row.params and max(row.params) > 0
                     for t, c in row.cells.items() if t == task and c.n}
              for task in sorted({str(r["task"]) for r in records})}
    panels = {t: p for t, p in panels.items() if len(p) > 1}
    if panels:
        task_floors: dict[str, float] = {}
        for (_, task), score in floors(table).items():
            task_floors[task] = max(task_floors.get(task, score), score)
        written += plot_methods_budget(panels, task_floors, out_dir / "budget-methods",
                                       title="score against tunable parameters, each method at its own budget")
    # A run's figures lie beside its metrics.json (wherever the run was made); listed from the records alone,
    # present or not, so the index regenerates byte-identically on a clone without them (they are not committed).
    figures = sorted({Path(r["_source"]).with_name(Path(a).name) for r in records if r.get("_source")
                      for a in r.get("artifacts") or [] if str(a).endswith((".png", ".pdf"))})
    if written or figures:
        lines = ["# Figures", ""] + [f"- [{p.name}]({p.name})" for p in written]
        if figures:
            lines += ["", "## Per-run figures", "", "Written by each run beside its metrics.json; a sweep commits "
                      "only metrics.json, config.yaml and predictions.jsonl, so a clone lacks them until the run is "
                      "made again.", ""]
            lines += [f"- [{_rel(f, out_dir)}]({_rel(f, out_dir)})" for f in figures]
        index = out_dir / "index.md"
        write_text(index, "\n".join(lines) + "\n")
        written.append(index)
    return written


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def _shown(path: Path) -> str:
    """A path as the command line should show it: relative to the working directory when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command_line(args: argparse.Namespace, out: Path) -> str:
    """The report's command in one canonical form (paths relative to the working directory), for the notes."""
    argv = ["python", "-m", "papeft.report", _shown(args.dir), "--out", _shown(out)]
    argv += ["--name", args.name] * (args.name != "median") + ["--paper", args.paper] * bool(args.paper)
    argv += ["--no-iqr"] * (not args.iqr) + ["--reference", args.reference] * bool(args.reference)
    argv += ["--claims", _shown(args.claims)] if args.claims is not None else []
    argv += ["--plots"] * args.plots
    return shlex.join(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m papeft.report", description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="directory scanned recursively for metrics.json and failed.json")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: dir)")
    ap.add_argument("--name", default="median", help="output file stem (default: median)")
    ap.add_argument("--paper", default=None, help="print the paper's numbers under ours: table1, table2, table3, "
                                                  "table6, table7_gpt2_large, table7_pythia_1_4b")
    ap.add_argument("--plots", action="store_true", help="also write figures (PNG + PDF) under OUT/plots/")
    ap.add_argument("--no-iqr", dest="iqr", action="store_false", help="medians only (the paper's layout)")
    ap.add_argument("--reference", default=None, metavar="METHOD", help="also write NAME-intervals.* (95%% bootstrap "
                    "interval per cell) and NAME-paired.* (METHOD minus each method, paired by seed and example)")
    ap.add_argument("--claims", type=Path, default=None, metavar="BENCH_DIR", help="also write NAME-claims.{md,csv}: "
                    "each testable claim of the papers with a verdict (speed claims from BENCH_DIR's benchmarks)")
    args = ap.parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    if args.claims is not None and not args.claims.is_dir():
        print(f"error: --claims {args.claims}: not a directory (the committed benchmarks, e.g. results/bench)",
              file=sys.stderr)
        return 2
    if not any(args.dir.rglob("metrics.json")) and not any(args.dir.rglob("failed.json")):
        print(f"error: no metrics.json found under {args.dir}", file=sys.stderr)
        return 1
    out = args.out or args.dir
    try:
        paths = write_tables([args.dir], out / args.name, paper=args.paper, iqr=args.iqr, reference=args.reference,
                             claims_from=args.claims, command=command_line(args, out))
    except (ValueError, KeyError) as exc:
        print(f"error: {exc} under {args.dir}", file=sys.stderr)
        return 1
    print(paths["md"].read_text(encoding="utf-8"), end="")
    if args.plots:
        figures = write_plots(args.dir, out / "plots")
        print("\nfigures:", ", ".join(str(p) for p in figures) if figures else
              "none (no method has runs at two or more budgets, and no run wrote a figure)")
    return 0

