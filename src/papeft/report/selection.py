"""The record of a hyper-parameter selection on dev data: which learning rate (and run length) each
method got on each task, chosen by the lowest dev loss, never by a test score, with the dev-loss
curves it was read from.

`python -m papeft.report.selection DIR [--out OUT]` scans DIR for runs (metrics.json + config.yaml)
that differ in `trainer.lr`, and writes `OUT/selection.{md,csv}` (per backbone, method and task:
each learning rate's best dev loss and its step, the chosen one marked) and `OUT/dev_curves.{png,pdf}`
(dev loss against optimizer steps, one panel per task and method, one line per learning rate; a
zero-shot run, when present, as a dashed line: the frozen backbone's dev loss).
Test scores of selection runs are listed for the record; they played no part in the choice. A run that
failed (its `failed.json`: a diverged loss, say) is listed with its reason and counts as tried. A rate
chosen at the edge of the rates tried is flagged (the next rate out should be tried), and the chosen rates
are printed as a `lrs` mapping for the protocol's config. `--adopt-into RUNS` copies each chosen run
(seed 0, its config unchanged) into a sweep's runs folder as that cell, so the sweep skips it when its
config hash matches (the sweep reruns it otherwise); a cell already finished there is left as it is.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from papeft.io import write_text
from papeft.report.plots import save_figure
from papeft.report.reproduction import run_config
from papeft.report.tables import collect, collect_failures


def rate_key(rec: dict) -> tuple[tuple[str, str, str], float] | None:
    """((backbone, method, task), trainer.lr from the config.yaml beside the run), None without a rate."""
    lr = (run_config(rec).get("trainer") or {}).get("lr")
    return None if lr is None else ((str(rec["backbone"]), str(rec["method"]), str(rec["task"])), float(lr))


def selection_runs(root: Path) -> dict[tuple[str, str, str], dict[float, dict]]:
    """(backbone, method, task) -> learning rate -> metrics record (seed 0 only when several)."""
    out: dict[tuple[str, str, str], dict[float, dict]] = {}
    for rec in collect(root):
        if not isinstance(rec.get("best_dev_loss"), (int, float)) or (found := rate_key(rec)) is None:
            continue
        key, lr = found
        held = out.setdefault(key, {}).get(lr)
        if held is None or rec["seed"] < held["seed"]:
            out[key][lr] = rec
    return out


def selection_failures(root: Path) -> dict[tuple[str, str, str], dict[float, dict]]:
    """(backbone, method, task) -> learning rate -> failure record, for the seed-0 runs that wrote `failed.json`."""
    out: dict[tuple[str, str, str], dict[float, dict]] = {}
    for rec in collect_failures(root):
        if rec.get("seed") == 0 and (found := rate_key(rec)) is not None:
            out.setdefault(found[0], {})[found[1]] = rec
    return out


def is_floor(by_lr: dict[float, dict]) -> bool:
    """A method that trains nothing (the zero-shot floor): drawn, never chosen."""
    return all(r["steps"] == 0 for r in by_lr.values())


def choice(by_lr: dict[float, dict]) -> float | None:
    """The learning rate with the lowest best dev loss (ties: the smaller rate); NaN losses never win;
    None when no rate reached a finite dev loss."""
    finite = {lr: r["best_dev_loss"] for lr, r in by_lr.items() if math.isfinite(r["best_dev_loss"])}
    return min(finite, key=lambda lr: (finite[lr], lr)) if finite else None


def edge_note(by_lr: dict[float, dict], failed: Sequence[float] = ()) -> str:
    """'' unless the chosen rate is the lowest or highest of two or more tried (finished or `failed`):
    then which rate to try next."""
    rates, pick = sorted({*by_lr, *failed}), choice(by_lr)
    if pick is None or len(rates) < 2 or rates[0] < pick < rates[-1]:
        return ""
    nxt = pick * rates[-1] / rates[-2] if pick == rates[-1] else pick * rates[0] / rates[1]
    decade = 10.0 ** math.floor(math.log10(nxt))                   # snapped to the 1-3-10 grid of rates
    nxt = min((v * decade for v in (1, 3, 10)), key=lambda v: abs(math.log(nxt / v)))
    return f"at the grid's edge: try {nxt:g}"


def first_sentence(error: str) -> str:
    return error.split(": ", 1)[0] if ": " in error else error.split(". ", 1)[0]


def selection_table(runs: dict[tuple[str, str, str], dict[float, dict]],
                    failures: dict[tuple[str, str, str], dict[float, dict]] | None = None) -> tuple[str, str]:
    """(Markdown, CSV) of every selection run, the chosen rate per (backbone, method, task) marked, and
    each failed run with its reason (a failed rate is never chosen)."""
    failures = failures or {}
    md = ["| backbone | method | task | lr | best dev loss | at step | of steps | chosen | test score (not used) |",
          "|---|---|---|---:|---:|---:|---:|---|---:|"]
    edges = []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["backbone", "method", "task", "lr", "best_dev_loss", "best_step", "steps", "chosen", "test_score",
                     "failed"])
    nothing = []
    for key in sorted({*runs, *failures}):
        (backbone, method, task), by_lr, failed = key, runs.get(key, {}), failures.get(key, {})
        if by_lr and is_floor(by_lr):
            continue
        pick = choice(by_lr)
        if pick is None:
            nothing.append(f"- {method} on {task} ({backbone}): no rate reached a finite dev loss; nothing chosen")
        elif note := edge_note(by_lr, [lr for lr in failed if lr not in by_lr]):
            edges.append(f"- {method} on {task} ({backbone}): {pick:g} {note}")
        for lr, rec in sorted({**failed, **by_lr}.items()):
            if lr not in by_lr:
                reason = " ".join(first_sentence(str(rec["error"])).split()).replace("|", "/")   # one table cell
                md.append(f"| {backbone} | {method} | {task} | {lr:g} | failed: {reason} | – | – |  | – |")
                writer.writerow([backbone, method, task, f"{lr:g}", "", "", "", "", "", reason])
                continue
            mark = "yes" if lr == pick else ""
            md.append(f"| {backbone} | {method} | {task} | {lr:g} | {rec['best_dev_loss']:.4f} | {rec['best_step']} | "
                      f"{rec['steps']} | {'**yes**' if mark else ''} | {rec['score']:.1f} |")
            writer.writerow([backbone, method, task, f"{lr:g}", round(rec["best_dev_loss"], 6), rec["best_step"],
                             rec["steps"], mark, round(rec["score"], 4), ""])
    legend = ("Chosen: the learning rate with the lowest dev loss (label tokens' cross-entropy on the dev split), "
              "seed 0. Test scores are listed for the record only; no choice read them. A failed run stopped before "
              "its test (its failed.json holds the traceback): it counts as tried and is never chosen.")
    if edges:
        legend += "\n\nChosen at the edge of the rates tried:\n\n" + "\n".join(edges)
    if nothing:
        legend += "\n\nNo choice:\n\n" + "\n".join(nothing)
    return "\n".join(md + ["", legend]) + "\n", buf.getvalue()


def chosen_rates(runs: dict[tuple[str, str, str], dict[float, dict]]) -> dict[str, dict[str, float]]:
    """task -> method -> chosen rate (the protocol's `lrs` when one task chooses for all)."""
    out: dict[str, dict[str, float]] = {}
    for (_, method, task), by_lr in sorted(runs.items()):
        if not is_floor(by_lr) and (pick := choice(by_lr)) is not None:
            out.setdefault(task, {})[method] = pick
    return out


def adopt(runs: dict[tuple[str, str, str], dict[float, dict]], into: Path) -> list[str]:
    """Copy each chosen run folder (without checkpoint or lock) to into/backbone/method/task/seedN, atomically;
    a cell with a metrics.json there is kept. One line per cell saying what happened."""
    lines = []
    for (backbone, method, task), by_lr in sorted(runs.items()):
        if is_floor(by_lr) or (pick := choice(by_lr)) is None:
            continue
        rec = by_lr[pick]
        source, target = Path(rec["_source"]).parent, into / backbone / method / task / f"seed{rec['seed']}"
        if (target / "metrics.json").exists():
            lines.append(f"kept {target} (finished there already)")
            continue
        staging = target.with_name(f".{target.name}.adopting-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("checkpoint", "cell.lock", ".*"))
        shutil.rmtree(target, ignore_errors=True)                 # an unfinished attempt of the cell
        staging.rename(target)
        lines.append(f"adopted {source} -> {target}")
    return lines


def plot_dev_curves(runs: dict[tuple[str, str, str], dict[float, dict]], stem: Path) -> list[Path]:
    """Dev loss against optimizer steps: a panel per (task, method), at most four to a row, a line per
    learning rate (one colour per rate throughout, the chosen one thick); the zero-shot floor's dev loss,
    when run, dashed in every panel of its task."""
    tasks = sorted({t for _, _, t in runs})
    methods = sorted({m for (_, m, _), by_lr in runs.items() if not is_floor(by_lr)})
    rates = sorted({lr for by_lr in runs.values() if not is_floor(by_lr) for lr in by_lr})
    cols = max(min(4, len(methods)), 1)
    per_task = math.ceil(len(methods) / cols) if methods else 1
    fig = Figure(figsize=(3.0 * cols, 2.4 * per_task * len(tasks)), layout="constrained")
    axes = fig.subplots(per_task * len(tasks), cols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat:
        ax.set_axis_off()
    for t_index, task in enumerate(tasks):
        floor = [by_lr for (_, _, t), by_lr in runs.items() if t == task and is_floor(by_lr)]
        for m_index, method in enumerate(methods):
            ax = axes[t_index * per_task + m_index // cols, m_index % cols]
            ax.set_axis_on()
            for (_, m, t), by_lr in sorted(runs.items()):
                if (m, t) != (method, task):
                    continue
                pick = choice(by_lr)
                for lr in sorted(by_lr):
                    history = by_lr[lr].get("dev_history") or []
                    ax.plot([h["step"] for h in history], [h["dev_loss"] for h in history],
                            color=f"C{rates.index(lr) % 10}", lw=2.2 if lr == pick else 1.0, marker="o", ms=2.5,
                            label=f"lr {lr:g}" + (" (chosen)" if lr == pick else ""))
            for by_lr in floor:
                ax.axhline(next(iter(by_lr.values()))["best_dev_loss"], color="0.4", ls="--", lw=1.0, label="zero-shot")
            ax.set_title(f"{method} on {task}", fontsize=8)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(labelsize=7, labelbottom=True, labelleft=True)
            ax.set_xlabel("optimizer step", fontsize=7)
            ax.set_ylabel("dev loss (log)", fontsize=7)
            if ax.lines:
                ax.legend(fontsize=6)
    return save_figure(fig, stem)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papeft.report.selection", description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="folder of selection runs (differing in trainer.lr)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: dir)")
    ap.add_argument("--adopt-into", type=Path, default=None, metavar="RUNS",
                    help="copy each chosen run into this sweep's runs folder as its cell (e.g. results/cpu_table1/runs)")
    args = ap.parse_args(argv)
    runs = selection_runs(args.dir) if args.dir.is_dir() else {}
    failures = selection_failures(args.dir) if args.dir.is_dir() else {}
    if not runs and not failures:
        print(f"error: no finished or failed run with a trainer.lr in its config.yaml under {args.dir}",
              file=sys.stderr)
        return 1
    out = args.out or args.dir
    md, table = selection_table(runs, failures)
    write_text(out / "selection.md", md)
    write_text(out / "selection.csv", table)
    figures = plot_dev_curves(runs, out / "dev_curves") if runs else []
    print(md, end="")
    for task, rates in chosen_rates(runs).items():
        print(f"chosen on {task}: lrs: {{{', '.join(f'{m}: {lr:.1e}' for m, lr in rates.items())}}}")
    print("written:", ", ".join(str(p) for p in [out / "selection.md", out / "selection.csv", *figures]))
    if args.adopt_into is not None:
        print("\n".join(adopt(runs, args.adopt_into)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
