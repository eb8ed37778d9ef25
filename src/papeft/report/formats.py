"""A median table (papeft.report.rows, filled by papeft.report.tables) as Markdown, CSV and booktabs LaTeX.

Layout of the paper's Table 1: one row per (backbone, method) with its tunable-parameter column,
one column per task; each cell is the median over seeds, followed by the interquartile range in
brackets when there are several seeds; best per column in bold, second underlined (Markdown:
italics), among the cells with every seed that beat the floor rows; `(n=k)` flags a cell with fewer
complete seeds than expected, `failed` a cell whose every run failed, `NaN` a cell whose every
finished run reported a NaN score (listed below the table with why), `–` a cell never run. Paper
rows (papeft.report.paper_numbers) come after ours, under a rule.
"""
from __future__ import annotations

import csv
import io
import re
from typing import Callable, Sequence

from papeft.report.paper_numbers import PaperTable
from papeft.report.rows import LOWER_IS_BETTER, Row, floors

MISSING = "–"
FAILED = "failed"
NAN = "NaN"


def format_params(n: int) -> str:
    """8950000 -> '8.95M', 123400 -> '123.4K', 512 -> '512'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def params_text(row: Row) -> str:
    if not row.params:
        return MISSING
    lo, hi = min(row.params), max(row.params)
    return format_params(lo) if lo == hi else f"{format_params(lo)}–{format_params(hi)}"


def tasks_of(rows: list[Row], paper: PaperTable | None = None) -> list[tuple[str, str]]:
    """(task, metric) columns: the paper's task order first when given, then the rest sorted."""
    found: dict[str, str] = {}
    for row in rows:
        for task, cell in row.cells.items():
            if cell.metric or task not in found:
                found[task] = found.get(task) or cell.metric or ""
    order = list(paper.tasks) if paper else []
    return sorted(found.items(), key=lambda tm: (order.index(tm[0]) if tm[0] in order else len(order), tm[0]))


def expected_seeds(rows: list[Row]) -> int:
    return max((c.n + c.failed + len(c.unscored) for r in rows if not r.floor for c in r.cells.values()), default=0)


def unscored_lines(rows: list[Row]) -> list[str]:
    """Why each run without a score has none, in table order."""
    return [line for r in rows for c in r.cells.values() for line in c.unscored]


def _ranks(rows: list[Row], task: str, metric: str, expected: int) -> dict[int, int]:
    """Row index -> 1 (best) or 2 (second) by displayed value (ties share a mark), among the cells with
    every expected seed that beat the column's floor rows (a mark at chance would mislead); needs >= 2."""
    higher = metric.lower() not in LOWER_IS_BETTER
    floor = floors(rows)
    shown = {i: f"{c.median:.1f}" for i, r in enumerate(rows) if not r.floor and (c := r.cells.get(task))
             and c.n >= max(expected, 1) and ((f := floor.get((r.backbone, task))) is None
                                              or (c.median > f if higher else c.median < f))}
    if len(shown) < 2:
        return {}
    order = sorted(set(shown.values()), key=float, reverse=higher)[:2]
    return {i: order.index(v) + 1 for i, v in shown.items() if v in order}


def _cells(rows: list[Row], tasks: list[tuple[str, str]], mark: dict[int, Callable[[str], str]],
           iqr: Callable[[str], str] | None, failed: str) -> list[list[str]]:
    """Formatted task cells per row: median (+ IQR), best/second marks, (n=k) / failed flags."""
    expected = expected_seeds(rows)
    out: list[list[str]] = [[] for _ in rows]
    for task, metric in tasks:
        ranks = _ranks(rows, task, metric, expected)
        for i, (cells, row) in enumerate(zip(out, rows)):
            cell = row.cells.get(task)
            if cell is None:
                cells.append(MISSING)
                continue
            flags = [f"{cell.failed} failed"] * bool(cell.failed) + [f"{len(cell.unscored)} NaN"] * bool(cell.unscored)
            if cell.n == 0:
                cells.append(NAN + (f" ({flags[0]})" if cell.failed else "") if cell.unscored else failed)
                continue
            text = f"{cell.median:.1f}"
            text = mark.get(ranks.get(i), str)(text)
            if iqr is not None and cell.n > 1:
                text += iqr(f"{cell.iqr:.1f}")
            if cell.n < expected and not row.floor:
                text += f" (n={cell.n}" + "".join(f", {f}" for f in flags) + ")"
            cells.append(text)
    return out


def _paper_cells(paper: PaperTable, tasks: list[tuple[str, str]]) -> list[tuple[str, str, list[str]]]:
    """(method label, params, cells) of the paper's rows, in our columns."""
    return [(pr.label, pr.params or MISSING,
             [f"{pr.scores[t]:.1f}" if t in pr.scores else MISSING for t, _ in tasks]) for pr in paper.rows]


FOOTER = ("Median over seeds, [interquartile range] when there are several; best per column in bold, "
          "second in italics, among the cells with every seed that beat the floor rows; `(n=k)`: fewer "
          "complete seeds than expected; floor rows first (`majority class`: "
          "the training split's most frequent label for every test example; `zero_shot`: the frozen backbone "
          "with the task's prompts, deterministic, one run); `failed`: every run failed; "
          f"`{NAN}`: every finished run reported a NaN score (listed below); `{MISSING}`: not run.")


def to_markdown(rows: list[Row], notes: Sequence[str] = (), paper: PaperTable | None = None,
                failures: Sequence[dict] = (), iqr: bool = True) -> str:
    """Markdown table plus its legend, the paper's rows (when given), notes and failed runs."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    tasks = tasks_of(rows, paper)
    head = ["backbone", "method", "params"] + [f"{t} ({m})" if m else t for t, m in tasks]
    lines = ["| " + " | ".join(map(esc, head)) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    body = _cells(rows, tasks, {1: lambda s: f"**{s}**", 2: lambda s: f"_{s}_"},
                  (lambda s: f" [{s}]") if iqr else None, FAILED)
    for row, cells in zip(rows, body):
        lines.append("| " + " | ".join([esc(row.backbone), esc(row.method), params_text(row)] + cells) + " |")
    if paper:
        for label, params, cells in _paper_cells(paper, tasks):
            lines.append("| " + " | ".join([esc(f"{paper.backbone} (paper)"), esc(label), params] + cells) + " |")
    lines += ["", FOOTER]
    if paper:
        lines += ["", f"Rows marked (paper): {paper.source}."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if unscored_lines(rows):
        lines += ["", "Runs without a score:", ""] + [f"- {esc(line)}" for line in unscored_lines(rows)]
    if failures:
        lines += ["", "Failed runs:", ""] + [f"- {failure_line(f)}" for f in failures]
    return "\n".join(lines) + "\n"


def failure_line(f: dict) -> str:
    error = str(f.get("error", "")).strip().splitlines()
    step = f.get("checkpoint_step")
    where = f" (checkpoint at step {step} kept)" if step is not None else ""
    return (f"{f.get('backbone')} / {f.get('method')} / {f.get('task')} / seed {f.get('seed')}: "
            f"{f.get('error_type', 'error')}: {error[0] if error else ''}{where}")


def to_csv(rows: list[Row], paper: PaperTable | None = None) -> str:
    """Machine-readable CSV: median, n, IQR and failed runs per task; missing cells left empty."""
    tasks = [t for t, _ in tasks_of(rows, paper)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["backbone", "method", "params"]
                    + [f"{t}_{s}" for t in tasks for s in ("median", "n", "iqr", "failed", "nan")])
    for row in rows:
        vals: list[object] = [row.backbone, row.method, max(row.params) if row.params else ""]
        for t in tasks:
            c = row.cells.get(t)
            if c is None:
                vals += ["", "", "", "", ""]
            elif c.n == 0:
                vals += ["", 0, "", c.failed, len(c.unscored)]
            else:
                vals += [round(c.median, 4), c.n, round(c.iqr, 4), c.failed, len(c.unscored)]
        writer.writerow(vals)
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
        "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Escape LaTeX special characters; a command-line flag's `--` stays two hyphens, not an en dash."""
    return re.sub(r"(?<![-\w])--(?=[a-z])", "-{}-", "".join(_TEX.get(ch, ch) for ch in str(text)))


def to_latex(rows: list[Row], notes: Sequence[str] = (), paper: PaperTable | None = None,
             iqr: bool = True, failures: Sequence[dict] = ()) -> str:
    """booktabs `tabular`: best per column bold, second underlined, IQR in small type; paper rows
    under a `\\midrule`; notes and failed runs (with their errors) below."""
    tasks = tasks_of(rows, paper)
    head = ["Backbone", "Method", "Params"] + [tex_escape(f"{t} ({m})" if m else t) for t, m in tasks]
    lines = [r"\begin{tabular}{ll" + "r" * (len(tasks) + 1) + "}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    body = _cells(rows, tasks, {1: lambda s: rf"\textbf{{{s}}}", 2: lambda s: rf"\underline{{{s}}}"},
                  (lambda s: rf"\,{{\scriptsize[{s}]}}") if iqr else None, r"\textit{failed}")
    for row, cells in zip(rows, body):
        lines.append(" & ".join([tex_escape(row.backbone), tex_escape(row.method),
                                 tex_escape(params_text(row))] + cells) + r" \\")
    if paper:
        lines.append(r"\midrule")
        for label, params, cells in _paper_cells(paper, tasks):
            lines.append(" & ".join([tex_escape(f"{paper.backbone} (paper)"), tex_escape(label),
                                     tex_escape(params)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    legend = "Median over seeds" + (", [interquartile range]" if iqr else "") + \
             "; best per column in bold, second underlined, among the cells with every seed that beat the " \
             "floor rows; (n=k): fewer complete seeds than expected; " \
             "floor rows first (majority class: the training split's most frequent label; zero_shot: the " \
             "frozen backbone, one run); " \
             "NaN: every finished run reported a NaN score."
    lines.append(rf"\par\footnotesize {tex_escape(legend)}")
    lines += [rf"\par\footnotesize {tex_escape('Without a score: ' + line)}" for line in unscored_lines(rows)]
    if paper:
        lines.append(rf"\par\footnotesize {tex_escape('Rows marked (paper): ' + paper.source + '.')}")
    lines += [rf"\par\footnotesize {tex_escape(n)}" for n in notes]
    lines += [rf"\par\footnotesize {tex_escape('Failed: ' + failure_line(f))}" for f in failures]
    return "\n".join(lines) + "\n"
