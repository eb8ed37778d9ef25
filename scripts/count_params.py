"""Tunable parameters of methods on backbones, built on the meta device: no weights, no hub.

    python scripts/count_params.py                              # every method on LLaMA-2 7B and SmolLM2-135M
    python scripts/count_params.py lora parade -b gemma_2b gpt2_large
    python scripts/count_params.py -b all --format csv --out params.csv

A backbone is a name under configs/backbone (or a path to such a YAML); its shape
comes from the YAML itself (papeft.backbone.loading.architecture_config). A method is a
name under configs/method. A method that does not apply to an architecture (a
role it lacks) gets an empty cell and the reason in the CSV's `note` column.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from papeft.backbone.loading import architecture_config, backbone_config
from papeft.paths import config_group, group_file
from papeft.io import write_text
from papeft.methods import build_method

METHOD_DIR = config_group("method")
README_BACKBONES = ["llama2_7b", "smollm2_135m"]      # the README's method table
CSV_FIELDS = ["backbone", "method", "params_trainable_no_bias", "params_trainable", "params_backbone", "note"]


def count_row(backbone: dict, method: dict) -> dict:
    """One method on one backbone (meta device): the method's tunable weights and the backbone's."""
    hf_config = architecture_config(backbone)
    row = {"backbone": backbone["name"], "method": method["name"], "params_trainable_no_bias": None,
           "params_trainable": None, "params_backbone": None, "note": ""}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        row["params_backbone"] = sum(p.numel() for p in model.parameters())
        try:
            row.update(build_method(model, method).param_counts())
        except ValueError as err:                   # e.g. a role the architecture lacks
            row["note"] = str(err)
    return row


def markdown(rows: list[dict]) -> str:
    """Methods down, backbones across, in the order of `rows`; reasons for empty cells below the table."""
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["backbone"], r["method"]): r for r in rows}
    total = {r["backbone"]: r["params_backbone"] for r in rows}
    lines = ["| method | " + " | ".join(f"{b} ({total[b]:,} weights): no bias / with bias" for b in backbones) + " |",
             "|---|" + "---|" * len(backbones)]
    for m in methods:
        cells = []
        for b in backbones:
            r = cell[b, m]
            cells.append("n/a" if r["note"] else f"{r['params_trainable_no_bias']:,} / {r['params_trainable']:,}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    notes = [f"* n/a: {r['method']} on {r['backbone']}: {r['note']}" for r in rows if r["note"]]
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    known_methods = sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))
    known_backbones = sorted(p.stem for p in config_group("backbone").glob("*.yaml"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"methods: {', '.join(known_methods)}\n"
                                        f"backbones: {', '.join(known_backbones)}")
    ap.add_argument("methods", nargs="*", metavar="METHOD", help="configs/method names (default: all)")
    ap.add_argument("-b", "--backbone", nargs="+", default=README_BACKBONES, metavar="BACKBONE",
                    help=f"configs/backbone names or YAML paths, or `all` (default: {' '.join(README_BACKBONES)})")
    ap.add_argument("--format", choices=["md", "csv"], default="md", help="Markdown table or CSV (long format)")
    ap.add_argument("--out", type=Path, help="write here (atomically) instead of stdout")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.methods) - set(known_methods))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(known_methods)}")
    args.methods = args.methods or known_methods
    args.backbone = known_backbones if args.backbone == ["all"] else args.backbone
    missing = [b for b in args.backbone if b not in known_backbones and not Path(b).is_file()]
    if missing:
        ap.error(f"unknown backbone(s) {missing}; known: {', '.join(known_backbones)} (or a YAML path)")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    backbones = [backbone_config(b) for b in args.backbone]
    methods = [group_file("method", m) for m in args.methods]
    rows = [count_row(b, m) for b in backbones for m in methods]
    text = markdown(rows) if args.format == "md" else csv_text(rows)
    if args.out:
        write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
