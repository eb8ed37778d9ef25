"""Tables and target checks of scripts/bench_multitenant.py (Markdown, CSV, LaTeX from one list of rows);
the table writer, the saved run and the machine description serve scripts/bench_train.py too.

A run is saved as `<stem>.json` (args, header, rows, targets) beside its tables; `rerender` writes the
tables again from that json with the same writer, byte for byte what the run wrote.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Sequence

import torch

from papeft.io import write_json, write_text
from papeft.report.provenance import cpu_model
from papeft.report.paper_numbers import SPEED_TABLE4
from papeft.report.formats import tex_escape

TARGETS_AT = (8, 8)              # (batch, tenants) of the acceptance targets
COLUMNS = ["batch", "tenants", "beams", "method", "prefill_ms", "prefill_x_bare", "prefill_spread_pct",
           "decode_tok_s", "decode_x_bare", "decode_spread_pct", "total_tok_s", "peak_mib", "peak_x_bare",
           "tensor_peak_mib", "tensor_peak_x_bare"]


def fmt(column: str, v, nan: str = "–") -> str:
    """Ratios (`*_x_*` columns) with 3 decimals, other floats with 1; NaN (not measured) as `nan`."""
    if isinstance(v, (str, int)) or v is None:
        return nan if v is None else str(v)
    return nan if v != v else f"{v:.3f}" if "_x_" in column else f"{v:.1f}"


def spread_pct(values: list[float]) -> float:
    return 100 * (max(values) - min(values)) / statistics.median(values)


def write_tables(rows: list[dict], stem: Path, header: str, columns: Sequence[str] = COLUMNS) -> dict[str, Path]:
    """`<stem>.md`, `.csv`, `.tex`: the header, then one line per row with `columns` in that order."""
    paths = {ext: stem.with_suffix(f".{ext}") for ext in ("md", "csv", "tex")}
    cells = [[fmt(c, r[c]) for c in columns] for r in rows]
    md = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(c) + " |" for c in cells]
    write_text(paths["md"], "\n".join(md) + "\n")
    write_text(paths["csv"], "\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns)
                                                               for r in rows]) + "\n")
    align = "".join("l" if isinstance(rows[0][c], str) else "r" for c in columns) if rows else "l" * len(columns)
    tex = ["% " + header.replace("\n", "\n% "), "\\begin{tabular}{" + align + "}",
           "\\toprule", " & ".join(map(tex_escape, columns)) + " \\\\", "\\midrule"]
    tex += [" & ".join(tex_escape(fmt(k, r[k], "--")) for k in columns) + " \\\\" for r in rows]
    write_text(paths["tex"], "\n".join(tex + ["\\bottomrule", "\\end{tabular}"]) + "\n")
    return paths


def save_run(stem: Path, rows: list[dict], header: str, args, targets: list[str], columns: Sequence[str] = COLUMNS,
             profile: str | None = None, command: str = "") -> None:
    """A benchmark's tables (md, csv, tex), its JSON (args, header, rows, targets) and, when given, its
    per-op profile as `<stem>-profile.txt` headed by the command and the machine."""
    write_tables(rows, stem, header, columns)
    write_json(stem.with_suffix(".json"), {"args": vars(args), "header": header, "rows": rows, "targets": targets})
    if profile is not None:
        write_text(stem.with_name(stem.name + "-profile.txt"),
                   f"# made by `{command}` on {machine(args.device)}\n" + profile + "\n")


def rerender(saved: Path, columns: Sequence[str] = COLUMNS, stem: Path | None = None) -> dict[str, Path]:
    """A saved run's md/csv/tex written again from its json (header and rows), without measuring:
    beside the json, or at `stem`. `columns`: the benchmark's (scripts/bench_train.py has its own)."""
    run = json.loads(Path(saved).read_text())
    return write_tables(run["rows"], stem or Path(saved).with_suffix(""), run["header"], columns)


def machine(device: str, threads: bool = True) -> str:
    """CPU model, cores and (`threads`) this process's torch threads, or the GPU; torch version."""
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = f"{cpu_model()}, {os.cpu_count()} cores" + f", {torch.get_num_threads()} torch threads" * threads
    return f"{where}, torch {torch.__version__}"


def check_targets(rows: list[dict]) -> list[str]:
    """PASS/MISS per target at batch 8 with 8 tenants (PARADE vs bare, peft LoRA, gathered LoRA)."""
    lines = []
    cell = {(r["batch"], r["tenants"], r["beams"], r["method"]): r for r in rows}
    for beams in sorted({r["beams"] for r in rows}):
        get = lambda m: cell.get((*TARGETS_AT, beams, m))             # noqa: E731
        p = get("parade")
        if p is None:
            continue
        checks = [("decode tok/s vs bare", get("bare"), "decode_tok_s", ">=", 0.97),
                  ("decode tok/s vs peft mixed-batch LoRA", get("lora_peft"), "decode_tok_s", ">=", 1.5),
                  ("decode tok/s vs gathered LoRA", get("lora_gathered"), "decode_tok_s", ">=", 1.1),
                  ("prefill time vs bare", get("bare"), "prefill_ms", "<=", 1.05),
                  ("peak tensor memory vs peft LoRA", get("lora_peft"), "tensor_peak_mib", "<=", 1.0),
                  ("peak tensor memory vs gathered LoRA", get("lora_gathered"), "tensor_peak_mib", "<=", 1.0),
                  ("peak process memory vs peft LoRA (CPU: RSS)", get("lora_peft"), "peak_mib", "<=", 1.0)]
        for what, other, key, op, bound in checks:
            if other is None:
                continue
            ratio = p[key] / other[key]
            if ratio != ratio:                                           # NaN: not measured (--no-tensor-peak)
                lines.append(f"n/a   beams={beams} PARADE {what}: not measured")
                continue
            ok = ratio >= bound if op == ">=" else ratio <= bound
            lines.append(f"{'PASS' if ok else 'MISS'}  beams={beams} PARADE {what}: {ratio:.3f}x (target {op} {bound})")
    return lines


def notes(targets: list[str]) -> str:
    at = f"batch {TARGETS_AT[0]} with {TARGETS_AT[1]} tenants"
    text = (f"targets are defined at {at}, smollm2_135m on 2 CPU cores" if targets
            else f"no PARADE cell at {at}: targets not checked")
    paper = "; ".join(f"{m} {v['beam1']}/{v['beam3']}" for m, v in SPEED_TABLE4.items())
    return text + f"\npaper Table 4 (LLaMA-2 7B, batch 1, tok/s beam 1/3): {paper}"
