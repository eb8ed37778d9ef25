"""Claims against reproduction: every claim of the papers this scale can test, the paper's number,
ours, and a verdict with its reason. The verdict rules are `RULES` below, printed under every claims table.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from papeft.io import write_text
from papeft.report.intervals import cell_interval, paired_interval
from papeft.report.paper_numbers import SPEED_TABLE4, get_table
from papeft.report.reproduction import Runs
from papeft.report.rows import FLOOR_METHODS

RULES = (
    "Score claims compare two methods on one task through their paired difference (papeft.report.intervals):",
    "",
    "- *holds*: the 95% interval of (claimed better - other) lies above 0;",
    "- *does not hold*: it lies below 0 (the other method is better);",
    "- *cannot be decided at this scale*: neither method's cell beats the task's floor (its interval's lower end "
    "is not above the majority-class rate or the zero-shot score), the interval spans 0, the two share fewer than "
    "five seeds (a bootstrap over two or three seeds is too narrow), or one of the two has no runs on the task.",
    "",
    "When only one of the two cells beats the floor, the verdict stands (at this budget one method learned the "
    "task and the other did not) and the reason says so; the caption names the cells whose answers name no label.",
    "Speed claims read the committed benchmarks under results/bench/ (training step; decode tokens/s); a ratio "
    "within the measurements' spread (the larger of the two methods') cannot be decided.",
    "Written by `python -m papeft.report DIR --reference parade --claims results/bench` as NAME-claims.{md,csv}.",
)
TABLE1_BASELINES = ("lora", "adalora", "bitfit", "ia3", "houlsby", "parallel", "ptuning_v2")
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "cannot be decided at this scale"
MIN_SEEDS = 5


@dataclass(frozen=True)
class Claim:
    claim: str
    task: str
    paper: str
    ours: str
    verdict: str
    reason: str
    tested: bool = False           # reached the interval test (enough seeds, a cell above the floor)


def _paper_difference(better: str, other: str, task: str) -> str:
    """The paper's own difference for a claim, from Table 1 or Table 6 (PARADE-1 stands for the last-token pooler)."""
    for table, other_as in (("table1", other), ("table6", "parade_1" if other == "para" else other)):
        t = get_table(table)
        a, b = t.row(better), t.row(other_as)
        if a and b and task in a.scores and task in b.scores:
            label = f" ({'' if other_as == other else 'PARADE-1, last-token pooler; '}{t.source})"
            return f"{a.scores[task]:.1f} vs {b.scores[task]:.1f} ({a.scores[task] - b.scores[task]:+.1f}){label}"
    return "no number in our sources"


def score_claim(groups: dict[tuple[str, str, str], Runs], backbone: str, task: str, better: str, other: str,
                claim: str, floor: float | None) -> Claim:
    a, b = groups.get((backbone, better, task)), groups.get((backbone, other, task))
    paper = _paper_difference(better, other, task)
    if not a or not b:
        absent = " and ".join(m for m, runs in ((better, a), (other, b)) if not runs)
        return Claim(claim, task, paper, "–", UNDECIDED, f"no finished run of {absent} on {task}")
    diff = paired_interval(a, b)
    if diff is None:
        return Claim(claim, task, paper, "fewer than two shared seeds", UNDECIDED, "not enough seeds")
    ours = f"{diff.estimate:+.1f} [{diff.low:+.1f}, {diff.high:+.1f}] (n={diff.n_seeds})" + "†" * (not diff.examples)
    cells = {m: cell_interval([r for r, _ in runs.values()], [p for _, p in runs.values()])
             for m, runs in ((better, a), (other, b))}
    above = {m: iv is not None and floor is not None and iv.low > floor for m, iv in cells.items()}
    if floor is not None and not any(above.values()):
        return Claim(claim, task, paper, ours, UNDECIDED,
                     f"neither {better} nor {other} beats the floor ({floor:.1f}): both at chance on this backbone")
    if diff.n_seeds < MIN_SEEDS:
        return Claim(claim, task, paper, ours, UNDECIDED, f"{diff.n_seeds} shared seeds of the {MIN_SEEDS} a verdict "
                     "needs: an interval over so few is too narrow")
    below = [m for m, ok in above.items() if not ok] if floor is not None else []
    caveat = f"; {below[0]} does not beat the floor ({floor:.1f})" if below else ""
    if diff.low > 0:
        return Claim(claim, task, paper, ours, HOLDS, f"{better} better, interval above 0{caveat}", tested=True)
    if diff.high < 0:
        return Claim(claim, task, paper, ours, FAILS, f"{other} better, interval below 0{caveat}", tested=True)
    return Claim(claim, task, paper, ours, UNDECIDED, f"the interval spans 0{caveat}", tested=True)


def ratio_verdict(ratio: float, spread_pct: float, faster_is_below_1: bool) -> str:
    """holds / does not hold when the ratio is further from 1 than the measurements' spread, else undecided."""
    if abs(1.0 - ratio) * 100 <= spread_pct:
        return UNDECIDED
    return HOLDS if (ratio < 1.0) == faster_is_below_1 else FAILS


def speed_claims(bench_dir: Path) -> list[Claim]:
    """PARADE's training step against LoRA's, and its decode speed against LoRA's (Table 4)."""
    out = []
    for path in sorted(bench_dir.glob("train-*.json")):
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
        for row in rows:
            lora = next((r for r in rows if r["method"] == "lora" and r["path"] == row["path"]), None)
            if row["method"] == "parade" and row["path"] != "today" and lora is not None:
                ratio = row["step_x_lora"]
                spread = max(row["step_spread_pct"], lora["step_spread_pct"])
                verdict = ratio_verdict(ratio, spread, faster_is_below_1=True)
                out.append(Claim("PARADE's training step <= LoRA's", path.stem, "not measured in the papers",
                                 f"{ratio:.3f}x LoRA's step ({row['path']}, median of {len(row['samples'])}; "
                                 f"spread PARADE {row['step_spread_pct']:.0f}%, LoRA {lora['step_spread_pct']:.0f}%)",
                                 verdict, f"from {path.name}" + ("; within the spread" if verdict == UNDECIDED else "")))
    for path in sorted(bench_dir.glob("multitenant-*.json")):
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
        for beams in (1, 3):
            pick = {r["method"]: r for r in rows if r["beams"] == beams and r["batch"] == 1 and r["tenants"] == 1}
            if "parade" in pick and "lora_peft" in pick:
                ratio = pick["parade"]["decode_tok_s"] / pick["lora_peft"]["decode_tok_s"]
                spread = max(pick["parade"]["decode_spread_pct"], pick["lora_peft"]["decode_spread_pct"])
                paper = SPEED_TABLE4["parade"][f"beam{beams}"] / SPEED_TABLE4["lora"][f"beam{beams}"]
                verdict = ratio_verdict(ratio, spread, faster_is_below_1=False)
                out.append(Claim("PARADE decodes faster than (unmerged) LoRA, Table 4", f"{path.stem}, beam {beams}",
                                 f"{paper:.2f}x (LLaMA-2 7B, batch 1)",
                                 f"{ratio:.2f}x (batch 1, one tenant; spread up to {spread:.0f}%)", verdict,
                                 f"from {path.name}" + ("; within the spread" if verdict == UNDECIDED else "")))
    return out


def write_claims(floor: dict[tuple[str, str], float], groups: dict[tuple[str, str, str], Runs],
                 bench_dir: Path | None, out_stem: Path, notes: Sequence[str]) -> dict[str, Path]:
    """NAME-claims.{md,csv}; `floor`: (backbone, task) -> the score to beat (papeft.report.rows.floors)."""
    pairs = [(f"PARADE >= {b} (Table 1)", "parade", b) for b in TABLE1_BASELINES]
    pairs += [("capsule pooler >= last-token pooler (PARADE vs PARA)", "parade", "para"),
              ("rational activation helps (PEDRO vs PARA)", "pedro", "para")]
    claims = []
    for backbone, task in sorted({(b, t) for b, m, t in groups if m not in FLOOR_METHODS}):   # a task tuned at all
        for text, better, other in pairs:
            claims.append(score_claim(groups, backbone, task, better, other, text, floor.get((backbone, task))))
    if bench_dir is not None:
        claims += speed_claims(bench_dir)
    md = ["| claim | task | paper | ours: difference [95% interval] | verdict | reason |", "|---|---|---|---|---|---|"]
    md += [f"| {c.claim} | {c.task} | {c.paper} | {c.ours} | **{c.verdict}** | {c.reason} |" for c in claims]
    counts = {v: sum(c.verdict == v for c in claims) for v in (HOLDS, FAILS, UNDECIDED)}
    tested = sum(c.tested for c in claims)
    md += ["", "Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".",
           f"{tested} score claim(s) reached the interval test, each at 95% and none corrected for the others: were "
           f"no two methods different, about {0.05 * tested:.1f} of them would still read holds or does not hold "
           "by chance.", "", *RULES]
    md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["claim", "task", "paper", "ours", "verdict", "reason"])
    writer.writerows([[c.claim, c.task, c.paper, c.ours, c.verdict, c.reason] for c in claims])
    paths = {"claims.md": out_stem.with_name(f"{out_stem.name}-claims.md"),
             "claims.csv": out_stem.with_name(f"{out_stem.name}-claims.csv")}
    write_text(paths["claims.md"], "\n".join(md) + "\n")
    write_text(paths["claims.csv"], buf.getvalue())
    return paths
