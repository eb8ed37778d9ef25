"""Median tables (Markdown, CSV, LaTeX) over the ``metrics.json`` files of finished runs.

Rows are (backbone, method), columns are tasks, and each cell is the median score over
seeds.  Only records with ``"status": "complete"`` are counted; unreadable or malformed
files are skipped with a warning naming the file.

CLI: ``python -m papeft.report <dir> [--out OUTDIR] [--name median]``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from papeft.io import write_text

REQUIRED = ("backbone", "method", "task", "seed", "metric", "score",
            "params_trainable_no_bias", "status")
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "ppl", "wer", "ter"})
MISSING = "–"


@dataclass
class Cell:
    """Aggregate of one (backbone, method, task) over its seeds."""

    metric: str
    scores: list[float]

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def median(self) -> float:
        return statistics.median(self.scores)

    @property
    def iqr(self) -> float:
        return quantile(self.scores, 0.75) - quantile(self.scores, 0.25)


@dataclass
class Row:
    """One table row: a (backbone, method) pair and its cells keyed by task."""

    backbone: str
    method: str
    params: list[int] = field(default_factory=list)
    cells: dict[str, Cell] = field(default_factory=dict)


def quantile(values: Sequence[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _problem(rec: object) -> str | None:
    """Why a record cannot be counted (None when it is well formed)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        return f"missing keys {missing}"
    score = rec["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f"score is not a finite number: {score!r}"
    return None


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

    Each returned record gains ``_source`` (the file path) and ``_mtime`` keys.
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
            records.append({**rec, "_source": str(path), "_mtime": path.stat().st_mtime})
    return records


def _dedupe(records: list[dict]) -> list[dict]:
    """Keep one record per (backbone, method, task, seed): the newest file by mtime."""
    best: dict[tuple, tuple[tuple[float, int], dict]] = {}
    for i, rec in enumerate(records):
        key = (rec["backbone"], rec["method"], rec["task"], rec["seed"])
        rank = (rec.get("_mtime", -math.inf), i)
        if key in best:
            old = best[key][1]
            keep = rec if rank > best[key][0] else old
            drop = old if keep is rec else rec
            warnings.warn(f"duplicate run {key}: keeping {keep.get('_source', '<dict>')}, "
                          f"ignoring {drop.get('_source', '<dict>')}", stacklevel=3)
            if keep is old:
                continue
        best[key] = (rank, rec)
    return [rec for _, rec in best.values()]


def median_table(records: Iterable[dict]) -> list[Row]:
    """Group complete records into rows sorted by (backbone, method)."""
    good = [r for r in records
            if _usable(r, str(r.get("_source", "<dict>")) if isinstance(r, dict) else "<record>")]
    rows: dict[tuple[str, str], Row] = {}
    for rec in _dedupe(good):
        key = (str(rec["backbone"]), str(rec["method"]))
        row = rows.setdefault(key, Row(*key))
        row.params.append(int(rec["params_trainable_no_bias"]))
        cell = row.cells.setdefault(str(rec["task"]), Cell(str(rec["metric"]), []))
        if str(rec["metric"]) != cell.metric:
            warnings.warn(f"task {rec['task']!r} reports metrics {cell.metric!r} and "
                          f"{rec['metric']!r}; using {cell.metric!r}", stacklevel=2)
        cell.scores.append(float(rec["score"]))
    return [rows[k] for k in sorted(rows)]


def collect_notes(records: Iterable[dict]) -> list[str]:
    """Union of the ``notes`` of complete records, in first-seen order."""
    notes: dict[str, None] = {}
    for rec in records:
        if isinstance(rec, dict) and rec.get("status") == "complete" and not _problem(rec):
            raw = rec.get("notes") or []
            for note in [raw] if isinstance(raw, str) else raw:
                notes.setdefault(str(note), None)
    return list(notes)


def format_params(n: int) -> str:
    """8950000 -> '8.95M', 123400 -> '123.4K', 512 -> '512'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _params_text(row: Row) -> str:
    lo, hi = min(row.params), max(row.params)
    return format_params(lo) if lo == hi else f"{format_params(lo)}–{format_params(hi)}"


def _tasks(rows: list[Row]) -> list[tuple[str, str]]:
    """Sorted (task, metric) pairs present in any row."""
    found: dict[str, str] = {}
    for row in rows:
        for task, cell in row.cells.items():
            found.setdefault(task, cell.metric)
    return sorted(found.items())


def _ranks(rows: list[Row], task: str, metric: str) -> dict[str, int]:
    """Map each displayed value of a column to 1 (best) or 2 (second); needs >= 2 values."""
    shown = {f"{r.cells[task].median:.1f}" for r in rows if task in r.cells}
    if sum(task in r.cells for r in rows) < 2:
        return {}
    order = sorted(shown, key=float, reverse=metric.lower() not in LOWER_IS_BETTER)
    return {v: i + 1 for i, v in enumerate(order[:2])}


def _cells(rows: list[Row], bold, underline) -> list[list[str]]:
    """Formatted task cells per row, with best/second marks and (n=k) flags."""
    max_n = max((c.n for r in rows for c in r.cells.values()), default=0)
    out = [[] for _ in rows]
    for task, metric in _tasks(rows):
        ranks = _ranks(rows, task, metric)
        for cells, row in zip(out, rows):
            cell = row.cells.get(task)
            if cell is None:
                cells.append(MISSING)
                continue
            text = f"{cell.median:.1f}"
            text = {1: bold, 2: underline}.get(ranks.get(text), str)(text)
            cells.append(text if cell.n >= max_n else f"{text} (n={cell.n})")
    return out


def to_markdown(rows: list[Row], notes: Sequence[str] = ()) -> str:
    """Markdown table (best per column in bold, second in italics) plus a notes list."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    head = ["backbone", "method", "params"] + [f"{t} ({m})" for t, m in _tasks(rows)]
    lines = ["| " + " | ".join(map(esc, head)) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    body = _cells(rows, lambda s: f"**{s}**", lambda s: f"_{s}_")
    for row, cells in zip(rows, body):
        lines.append("| " + " | ".join([esc(row.backbone), esc(row.method), _params_text(row)]
                                       + cells) + " |")
    lines += ["", "Median over seeds; `(n=k)` marks cells with fewer seeds than the maximum; "
              f"`{MISSING}` marks a cell with no complete run."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    """Machine-readable CSV: median, n and IQR per task; missing cells left empty."""
    tasks = [t for t, _ in _tasks(rows)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["backbone", "method", "params"]
                    + [f"{t}_{s}" for t in tasks for s in ("median", "n", "iqr")])
    for row in rows:
        vals: list[object] = [row.backbone, row.method, max(row.params)]
        for t in tasks:
            c = row.cells.get(t)
            vals += ["", "", ""] if c is None else [round(c.median, 4), c.n, round(c.iqr, 4)]
        writer.writerow(vals)
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
        "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Escape LaTeX special characters."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(rows: list[Row], notes: Sequence[str] = ()) -> str:
    """booktabs ``tabular``: best per column bold, second underlined; notes below."""
    tasks = _tasks(rows)
    head = ["Backbone", "Method", "Params"] + [tex_escape(f"{t} ({m})") for t, m in tasks]
    lines = [r"\begin{tabular}{ll" + "r" * (len(tasks) + 1) + "}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    body = _cells(rows, lambda s: rf"\textbf{{{s}}}", lambda s: rf"\underline{{{s}}}")
    for row, cells in zip(rows, body):
        lines.append(" & ".join([tex_escape(row.backbone), tex_escape(row.method),
                                 tex_escape(_params_text(row))] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {tex_escape(n)}" for n in notes]
    return "\n".join(lines) + "\n"


def write_tables(run_dirs_or_metrics: Sequence[Path | str | dict], out_stem: Path | str
                 ) -> dict[str, Path]:
    """Write ``<out_stem>.md/.csv/.tex`` (atomically) from run dirs, metrics files or dicts.

    Directories are scanned recursively for ``metrics.json``. Raises ``ValueError`` when
    no complete run is found.
    """
    records: list[dict] = []
    for item in run_dirs_or_metrics:
        records += [item] if isinstance(item, dict) else collect(item)
    rows = median_table(records)
    if not rows:
        raise ValueError("no complete runs to tabulate")
    notes = collect_notes(records)
    stem = Path(out_stem)
    texts = {"md": to_markdown(rows, notes), "csv": to_csv(rows), "tex": to_latex(rows, notes)}
    paths = {}
    for ext, text in texts.items():
        paths[ext] = stem.with_name(f"{stem.name}.{ext}")
        write_text(paths[ext], text)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m papeft.report", description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="directory scanned recursively for metrics.json")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: dir)")
    ap.add_argument("--name", default="median", help="output file stem (default: median)")
    args = ap.parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    if not any(args.dir.rglob("metrics.json")):
        print(f"error: no metrics.json found under {args.dir}", file=sys.stderr)
        return 1
    try:
        paths = write_tables([args.dir], (args.out or args.dir) / args.name)
    except ValueError as exc:
        print(f"error: {exc} under {args.dir}", file=sys.stderr)
        return 1
    print(paths["md"].read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
