"""Run `python run.py method=M task=T trainer=smoke` for many methods or tasks and tabulate what they wrote.

    python scripts/smoke_matrix.py --methods all --task copa          # issue 3: every method on COPA
    python scripts/smoke_matrix.py --tasks copa,rte,... --method parade  # issue 4: every task

Writes results/smoke/<name>.md (score, train step time, relative to LoRA when LoRA is in the set),
with the exact command lines; runs go to results/smoke/runs/. Extra Hydra overrides follow `--`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from papeft.io import write_text  # noqa: E402
from papeft.paths import config_group  # noqa: E402


def run_cell(method: str, task: str, extra: list[str], out_root: Path) -> dict:
    cmd = [sys.executable, "run.py", f"method={method}", f"task={task}", "trainer=smoke",
           "trainer.progress=false", f"output_root={out_root}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    metrics_files = sorted(out_root.glob(f"*/{method}/{task}/seed*/metrics.json"))
    row = {"method": method, "task": task, "wall_s": wall, "rc": proc.returncode,
           "command": "python " + " ".join(cmd[1:])}
    if proc.returncode == 0 and metrics_files:
        m = json.loads(metrics_files[-1].read_text())
        row.update(score=m["score"], metric=m["metric"], step_s=m["train_time_s"] / max(m["steps"], 1),
                   params=m["params_trainable_no_bias"], extra=m.get("metrics", {}))
    else:
        row["error"] = (proc.stderr or proc.stdout)[-400:].replace("\n", " ")
    print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lora = next((r for r in rows if r["method"] == "lora" and "step_s" in r), None)
    head = "| method | task | metric | score | train step (s) | vs LoRA | tunable (no bias) | wall (s) |\n"
    head += "|---|---|---|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['method']} | {r['task']} | FAILED (rc {r['rc']}) | | | | | {r['wall_s']:.0f} |")
            continue
        rel = f"{r['step_s'] / lora['step_s']:.2f}x" if lora else "–"
        lines.append(f"| {r['method']} | {r['task']} | {r['metric']} | {r['score']:.1f} | {r['step_s']:.2f} | "
                     f"{rel} | {r['params']:,} | {r['wall_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="lora", help="comma list, or 'all' (every configs/method/*.yaml)")
    ap.add_argument("--tasks", default="copa", help="comma list of task names")
    ap.add_argument("--name", default="smoke")
    ap.add_argument("--out-root", default="results/smoke/runs", help="where the runs go (finished runs are skipped)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = ap.parse_args()
    methods = (sorted(p.stem for p in config_group("method").glob("*.yaml"))
               if args.methods == "all" else args.methods.split(","))
    if "lora" in methods:                       # LoRA first: the reference for step times
        methods.remove("lora")
        methods.insert(0, "lora")
    out_root = REPO / args.out_root
    rows = [run_cell(m, t, args.overrides, out_root) for t in args.tasks.split(",") for m in methods]
    cmd = "python scripts/smoke_matrix.py " + " ".join(sys.argv[1:])
    text = (f"# {args.name}\n\nMade by `{cmd}` (trainer=smoke: 24 optimizer steps, 32 train / 16 test "
            f"examples; scores say nothing about the methods).\n\n" + table(rows) +
            "\nPer cell: `" + rows[0]["command"].replace(str(out_root), args.out_root) + "` (method/task varied).\n")
    write_text(REPO / f"results/smoke/{args.name}.md", text)
    print(text)
    sys.exit(0 if all("step_s" in r for r in rows) else 1)


if __name__ == "__main__":
    main()
