"""What a reproduction table needs beyond medians: the protocol it ran under, a 95% bootstrap
interval per cell, and each method's paired difference against a reference method (PARADE).

Written beside the median table by `python -m papeft.report DIR --reference parade`:
`<name>-intervals.{md,csv,tex}` and `<name>-paired.{md,csv,tex}`; `protocol_lines` go into every
table's notes (backbone, split and sizes per task, run length, learning rate per method, decoding,
the cuts the experiment states). Intervals: papeft.report.intervals.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import OmegaConf

from papeft.io import write_text
from papeft.report.formats import tex_escape
from papeft.report.intervals import Interval, cell_interval, example_scores, off_label_share, paired_interval
from papeft.report.rows import FLOOR_METHODS

Runs = dict[int, tuple[dict, dict | None]]          # seed -> (metrics record, uid -> per-example score)


def group_runs(records: Iterable[dict]) -> dict[tuple[str, str, str], Runs]:
    """(backbone, method, task) -> its seeds' records and per-example scores (deduped records in; a run
    whose score is NaN has no place in an interval and is left out)."""
    groups: dict[tuple[str, str, str], Runs] = {}
    for rec in records:
        if math.isnan(rec["score"]):                  # no score: the median table lists it with why
            continue
        key = (str(rec["backbone"]), str(rec["method"]), str(rec["task"]))
        groups.setdefault(key, {})[int(rec["seed"])] = (rec, example_scores(rec))
    return groups


def majority_scores(records: Iterable[dict]) -> dict[tuple[str, str], tuple[str, float]]:
    """(backbone, task) -> (metric, score) of answering the training split's most frequent label
    (`majority_class` of the task's runs; when they differ, which a changed split would cause, the one of
    the last run by file path, as papeft.report.tables keeps duplicates)."""
    found: dict[tuple[str, str], tuple[str, str, float]] = {}
    for rec in records:
        floor = rec.get("majority_class")
        if isinstance(floor, dict) and isinstance(floor.get("score"), (int, float)):
            key, rank = (str(rec["backbone"]), str(rec["task"])), str(rec.get("_source", ""))
            if key not in found or rank > found[key][0]:
                found[key] = (rank, str(rec["metric"]), float(floor["score"]))
    return {key: (metric, score) for key, (_, metric, score) in found.items()}


def run_config(record: dict) -> dict:
    """The resolved config.yaml beside a run's metrics.json ({} when absent)."""
    source = record.get("_source")
    path = Path(source).with_name("config.yaml") if source else None
    if path is None or not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def _values(records: Iterable[dict], pick) -> list[str]:
    found: dict[str, None] = {}
    for rec in records:
        value = pick(rec)
        if value is not None:
            found.setdefault(str(value), None)
    return list(found)


def protocol_lines(records: Sequence[dict]) -> list[str]:
    """The protocol of the tabulated runs, read from their records and configs: backbone, per task the
    split and its sizes and the run length, per method the learning rate, decoding, precision, cuts."""
    configs = [(rec, run_config(rec)) for rec in records]
    trained = [(r, c) for r, c in configs if r["method"] not in FLOOR_METHODS]
    lines = [f"Backbone: {', '.join(_values(records, lambda r: r['backbone']))}."]
    for task in sorted({str(r["task"]) for r in records}):
        runs = [(r, c) for r, c in trained if r["task"] == task] or [(r, c) for r, c in configs if r["task"] == task]
        sizes = _values((r for r, _ in runs), lambda r: f"{r.get('n_train')} / {r.get('n_dev')} / {r.get('n_test')}")
        steps = _values((r for r, _ in runs), lambda r: f"{r.get('steps')} steps at batch {r.get('batch_size')}")
        split = _values((r for r, _ in runs), lambda r: r.get("split_protocol"))
        lines.append(f"{task}: split_protocol {', '.join(split)}; train / dev / test {', '.join(sizes)}; "
                     f"{', '.join(steps)}.")
    lrs = {}
    for rec, cfg in trained:
        lr = (cfg.get("trainer") or {}).get("lr")
        if lr is not None:
            lrs.setdefault(str(rec["method"]), {})[f"{lr:g}"] = None
    if lrs:
        lines.append("Learning rate per method: " + "; ".join(f"{m} {', '.join(v)}" for m, v in sorted(lrs.items()))
                     + ".")
    beams = _values(records, lambda r: r.get("num_beams"))
    precision = _values(records, lambda r: r.get("precision"))
    lines.append(f"Decoding: {', '.join(beams)} beam(s); precision {', '.join(precision)}.")
    tasks = [str(r["task"]) for r in records]
    lines += [f"Cut: {c}" for c in task_notes(((str(r["task"]), str(cut)) for r, cfg in configs
                                                for cut in cfg.get("cuts") or []), tasks)]
    return lines


def off_label_line(records: Sequence[dict], at_least: float = 0.1) -> list[str]:
    """A caption line naming the cells whose answers often name no label at all (median share over seeds
    >= `at_least`): such a cell is at or under chance by format, not by judgement (the frozen backbone
    answering in prose, a short run that has not learned the label words)."""
    shares: dict[tuple[str, str, str], list[float]] = {}
    for rec in records:
        share = off_label_share(rec)
        if share is not None:
            shares.setdefault((str(rec["backbone"]), str(rec["task"]), str(rec["method"])), []).append(share)
    cells = sorted((key, statistics.median(v)) for key, v in shares.items() if statistics.median(v) >= at_least)
    if not cells:
        return []
    several = len({str(r["backbone"]) for r in records}) > 1
    return ["Answers that name no label word (wrong whatever the gold label), median share over seeds, where "
            f">= {at_least:.0%}: " + "; ".join(f"{backbone + ': ' if several else ''}{method} on {task} {share:.0%}"
                                               for (backbone, task, method), share in cells) + "."]


def task_notes(pairs: Iterable[tuple[str, str]], tasks: Iterable[str]) -> list[str]:
    """(task, note) pairs -> each note once, in first-seen order, led by the tasks whose runs carry it unless
    runs of every one of `tasks` (a table's tasks) do: a reader sees which task a cut or a split note is about."""
    every = set(tasks)
    holds_for: dict[str, dict[str, None]] = {}
    for task, note in pairs:
        holds_for.setdefault(note, {})[task] = None
    return [note if every <= set(ts) else f"{', '.join(sorted(ts))}: {note}" for note, ts in holds_for.items()]


def _order(keys: Iterable[tuple[str, str, str]], order: Sequence[str]) -> tuple[list[str], list[str]]:
    rank = {m: i for i, m in enumerate([*FLOOR_METHODS, *order])}
    methods = sorted({m for _, m, _ in keys}, key=lambda m: (rank.get(m, len(rank)), m))
    return methods, sorted({t for _, _, t in keys})


def _fmt(iv: Interval | None, signed: bool = False) -> str:
    if iv is None:
        return "–"
    sign = "+" if signed else ""
    star = "" if iv.examples else "†"
    return f"{iv.estimate:{sign}.1f} [{iv.low:{sign}.1f}, {iv.high:{sign}.1f}]{star}"


def _render(title: str, legend: str, head: list[str], body: list[list[str]], csv_head: list[str],
            csv_body: list[list], notes: Sequence[str]) -> dict[str, str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    md = [f"{title}", "", "| " + " | ".join(map(esc, head)) + " |",
          "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    md += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    md += ["", legend] + (["", "Notes:", ""] + [f"- {n}" for n in notes] if notes else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_head)
    writer.writerows(csv_body)
    tex = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule",
           " & ".join(tex_escape(h) for h in head) + r" \\", r"\midrule"]
    tex += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in body]
    tex += [r"\bottomrule", r"\end{tabular}", rf"\par\footnotesize {tex_escape(legend)}"]
    tex += [rf"\par\footnotesize {tex_escape(n)}" for n in notes]
    return {"md": "\n".join(md) + "\n", "csv": buf.getvalue(), "tex": "\n".join(tex) + "\n"}


def interval_tables(groups: dict[tuple[str, str, str], Runs], order: Sequence[str], notes: Sequence[str]) -> dict:
    methods, tasks = _order(groups, order)
    backbones = sorted({b for b, _, _ in groups})
    body, rows = [], []
    for backbone in backbones:
        for method in methods:
            cells, flat = [], [backbone, method]
            for task in tasks:
                runs = groups.get((backbone, method, task), {})
                seeds = sorted(runs)
                iv = cell_interval([runs[s][0] for s in seeds], [runs[s][1] for s in seeds]) if runs else None
                cells.append(_fmt(iv) + (f" (n={len(seeds)})" if runs else ""))
                flat += ([round(iv.estimate, 4), round(iv.low, 4), round(iv.high, 4), iv.n_seeds, iv.examples]
                         if iv else ["", "", "", len(seeds), ""])
            if any(c != "–" for c in cells):
                body.append([f"{method}" if len(backbones) == 1 else f"{backbone} / {method}"] + cells)
                rows.append(flat)
    legend = ("Median over seeds [95% bootstrap interval] (n = seeds): seeds and test examples resampled together "
              "(2,000 replicates); † seeds only (the task's score is not a mean over examples, or a seed's "
              "predictions are missing or unreadable: a warning names the file); – fewer than two seeds.")
    head = ["method"] + tasks
    csv_head = ["backbone", "method"] + [f"{t}_{s}" for t in tasks for s in ("median", "low", "high", "n", "examples")]
    return _render("Per-cell 95% intervals", legend, head, body, csv_head, rows, notes)


def paired_tables(groups: dict[tuple[str, str, str], Runs], reference: str, order: Sequence[str],
                  notes: Sequence[str]) -> dict:
    """`reference` minus each other method, per task, over the seeds both have."""
    methods, tasks = _order(groups, order)
    backbones = sorted({b for b, _, _ in groups})
    body, rows = [], []
    for backbone in backbones:
        for method in [m for m in methods if m != reference]:
            cells, flat = [], [backbone, method]
            for task in tasks:
                ref, other = groups.get((backbone, reference, task)), groups.get((backbone, method, task))
                iv = paired_interval(ref, other) if ref and other else None
                cells.append(_fmt(iv, signed=True) + (f" (n={iv.n_seeds})" if iv else ""))
                flat += ([round(iv.estimate, 4), round(iv.low, 4), round(iv.high, 4), iv.n_seeds, iv.examples]
                         if iv else ["", "", "", "", ""])
            if any(c != "–" for c in cells):
                body.append([f"{reference} − {method}" if len(backbones) == 1 else f"{backbone}: {reference} − {method}"]
                            + cells)
                rows.append(flat)
    legend = (f"{reference} minus each method, paired by seed and test example: median over the shared seeds of "
              f"the per-seed difference [95% bootstrap interval] (n = shared seeds); an interval above 0 favours "
              f"{reference}, below 0 the other method; † seeds only; – fewer than two shared seeds.")
    if not body:
        legend = f"No method shares two finished seeds with {reference} on any task yet. " + legend
    head = ["difference"] + tasks
    csv_head = ["backbone", "method"] + [f"{t}_{s}" for t in tasks for s in ("diff", "low", "high", "n", "examples")]
    return _render(f"Paired differences against {reference}", legend, head, body, csv_head, rows, notes)


def write_reproduction(records: Sequence[dict], out_stem: Path, reference: str | None, order: Sequence[str],
                       notes: Sequence[str]) -> dict[str, Path]:
    """`<stem>-intervals.*` and, with a reference method, `<stem>-paired.*`; returns the paths."""
    groups = group_runs(r for r in records if r["method"] != "majority class")
    tables = {"intervals": interval_tables(groups, order, notes)}
    if reference:
        if not any(m == reference for _, m, _ in groups):
            raise ValueError(f"--reference {reference}: no run of method {reference!r}")
        tables["paired"] = paired_tables(groups, reference, order, notes)
    paths = {}
    for kind, texts in tables.items():
        for ext, text in texts.items():
            path = out_stem.with_name(f"{out_stem.name}-{kind}.{ext}")
            write_text(path, text)
            paths[f"{kind}.{ext}"] = path
    return paths
