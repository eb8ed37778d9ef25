"""Training speed and memory of the shared trainer: today's path against the new one, interleaved.

    python scripts/bench_train.py                      # SmolLM2-135M, COPA, batch 16; 5 methods; fp32 and bf16
    python scripts/bench_train.py --batch-size 8 --repeats 3 --methods lora,parade      # a quicker check
    python scripts/bench_train.py --random-config llama2_7b --seq-len 512 --precisions bf16 --methods lora,parade
                                                       # the paper's shape on a GPU (random weights, MFU column)
    python scripts/bench_train.py --profile lora,parade    # after the table: per-op self time, side by side

Paths (one row each, per method):
  today       the trainer before issue 13: full-vocabulary logits at every position, upcast to
              float32; the backbone as `backbone.dtype` loads it, no autocast; micro-batches
              in the step's order (`Trainer(token_loss=full_logits_token_loss)`, precision fp32,
              sort_micro_batches false)
  new-fp32    the trainer now: logits only where the loss reads them, micro-batches sorted by length
  new-bf16    the same under bfloat16 autocast, frozen backbone stored in bfloat16 (new-fp16 alike)

One measured call is one optimizer step of the shared trainer on the same examples: `Trainer.fit`
with max_steps 1 (forward, backward, clipping, AdamW; PEDRO's includes its outer step on D_val).
tokens/s = attended tokens of the step / its wall time (what metrics.json calls train_tokens_per_s);
cpu_s = the CPU time of this process during the step (all threads): on a machine other jobs share,
its ratios (cpu_speed_x_today) move less than wall-clock ones, most of all with --threads 1.
Peak memory = the step's peak of live tensors, weights included: CUDA's max_memory_allocated; on
CPU the resident weights plus the tensor storages one extra, untimed, traced step allocates.
Cells are interleaved: every repeat runs every (method, path) in turn, the order reversed every
other repeat, so load drift hits all cells alike; medians, ratios to today's path of the same
method (tok_s_x_today) and to LoRA's step on the same path (step_x_lora).
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from papeft.backbone.loading import DTYPES, backbone_config, load_backbone, load_tokenizer
from papeft.train.loss import full_logits_token_loss, response_token_loss
from papeft.train.precision import PRECISIONS
from papeft.tasks.prompting import Encoded, PromptFormatter
from papeft.bench.tables import machine, save_run, spread_pct
from papeft.serving.memory import TensorPeak, sync
from papeft.tasks import get_task
from papeft.train.trainer import Trainer, TrainerConfig
from papeft.methods import build_method
from papeft.paths import composed, config_group, group_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "lora,parade,pedro,ia3,ptuning_v2"
RANDOM_SHAPES = {
    "llama2_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny_llama": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # tests
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}     # dense bf16 tensor-core peak (vendor sheets)
COLUMNS = ["method", "path", "step_s", "step_spread_pct", "cpu_s", "tok_s", "tok_s_x_today", "cpu_speed_x_today",
           "step_x_lora", "peak_mib", "tokens", "mfu_pct"]
TARGETS = [("new-fp32 tokens/s vs today", "new-fp32", ">=", 1.2),
           ("new-bf16 tokens/s vs today's fp32", "new-bf16", ">=", 2.2)]


# ---- examples and models --------------------------------------------------------
def examples_for(args, vocab: int) -> list[Encoded]:
    """The step's examples: the first `--batch-size` of the task's training split (its fixed shuffle),
    or, with --seq-len, random ids: (seq_len - 4) prompt tokens and 4 response tokens each."""
    if args.seq_len:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g).tolist()
        return [Encoded(row[:-4], row[-4:]) for row in ids]
    cfg = backbone_cfg(args)
    tok = load_tokenizer(cfg)
    fmt = PromptFormatter(tok, cfg.get("chat_template", "auto"), cfg.get("system_prompt"), 2048)
    task_cfg = {**composed("task", args.task), "max_train_samples": args.batch_size}
    splits = get_task(args.task).load(task_cfg, os.environ.get("PAPEFT_DATA", "data"))
    if len(splits.train) < args.batch_size:
        raise SystemExit(f"task {args.task}: {len(splits.train)} training examples, --batch-size {args.batch_size}")
    return [fmt.encode(e.prompt, e.response) for e in splits.train[:args.batch_size]]


def backbone_cfg(args) -> dict:
    cfg = backbone_config(args.backbone)
    if args.dtype:
        cfg["dtype"] = args.dtype
    return cfg


def fresh_backbone(args) -> nn.Module:
    if args.random_config:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(RANDOM_SHAPES[args.random_config],
                                                     dtype=DTYPES[args.dtype or "float32"])
        model.generation_config.pad_token_id = 0
        return model.eval()
    return load_backbone(backbone_cfg(args))[0]


def path_specs(precisions: list[str]) -> dict[str, dict]:
    """path -> the Trainer's precision, token loss and micro-batch order."""
    specs = {"today": {"precision": "fp32", "token_loss": full_logits_token_loss, "sort_micro_batches": False}}
    for p in precisions:
        specs[f"new-{p}"] = {"precision": p, "token_loss": response_token_loss, "sort_micro_batches": True}
    return specs


def build_trainers(args, methods: list[str], specs: dict) -> dict:
    """(method, path) -> Trainer. Paths whose frozen weights are stored alike share one model
    (fp32 keeps the dtype the backbone loads in, bf16/fp16 store it in theirs)."""
    loaded = DTYPES[args.dtype or ("float32" if args.random_config else backbone_cfg(args).get("dtype", "float32"))]
    tok = None if args.random_config else load_tokenizer(backbone_cfg(args))
    pad_id, eos_id = (0, 2) if tok is None else (tok.pad_token_id, tok.eos_token_id)
    trainers = {}
    for m in methods:
        method_cfg = group_file("method", m)
        models = {}
        for path, spec in specs.items():
            key = loaded if spec["precision"] == "fp32" else PRECISIONS[spec["precision"]]
            if key not in models:
                models[key] = build_method(fresh_backbone(args), method_cfg)
                if tok is not None:
                    models[key].set_tokenizer(tok)
            cfg = TrainerConfig(lr=1e-4, warmup_ratio=0.0, max_steps=1, batch_size=args.batch_size,
                                micro_batch_size=args.micro_batch_size, device=args.device, progress=False,
                                precision=spec["precision"], sort_micro_batches=spec["sort_micro_batches"])
            trainers[m, path] = Trainer(models[key], cfg, pad_id, eos_id, seed=0, token_loss=spec["token_loss"])
    return trainers


# ---- measurement ----------------------------------------------------------------
def measure(trainer: Trainer, examples: list[Encoded], device: str) -> dict:
    """One optimizer step: wall time, CPU time of this process (all its threads), CUDA's allocator peak."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fit = trainer.fit(examples, [])
    sync(device)
    step_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {"step_s": step_s, "cpu_s": cpu_s, "tokens": fit["train_tokens"],
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")}


def traced_peak_mib(trainer: Trainer, examples: list[Encoded]) -> float:
    """CPU: resident tensors plus the peak of the storages one step allocates (optimizer state included)."""
    resident = list(trainer.model.parameters()) + list(trainer.model.buffers())
    with TensorPeak(resident) as tracker:
        trainer.fit(examples, [])
    weights = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in resident}.values())
    return (weights + tracker.peak) / 2**20


def step_flops(model: nn.Module, examples: list[Encoded]) -> float:
    """The useful model FLOPs of one step with a frozen backbone, the same for every path: per token,
    forward 2N and backward w.r.t. activations 2N (no weight gradients; N = decoder weights), attention
    12 L d T (QK^T and AV: forward 4 L d T, backward twice that); the LM head (4 V d) only at the
    positions the loss reads. Adapter FLOPs are left out (under 2% of the backbone's for these methods)."""
    backbone = model.backbone
    c, head = backbone.config, backbone.get_output_embeddings().weight
    decoder = sum(p.numel() for n, p in backbone.named_parameters() if p.dim() == 2
                  and p is not head and p is not backbone.get_input_embeddings().weight)
    total = 0.0
    for e in examples:
        t = len(e.prompt) + len(e.response)
        total += t * (4 * decoder + 12 * c.num_hidden_layers * c.hidden_size * t) + len(e.response) * 4 * head.numel()
    return total


def run(args, trainers: dict, examples: list[Encoded], methods: list[str], paths: list[str]) -> list[dict]:
    cells = [(m, p) for m in methods for p in paths]
    for _ in range(args.warmup):
        for cell in cells:
            measure(trainers[cell], examples, args.device)
    samples = {cell: [] for cell in cells}
    for rep in range(args.repeats):
        for cell in (cells if rep % 2 == 0 else cells[::-1]):            # A B C ..., then C B A ...
            samples[cell].append(measure(trainers[cell], examples, args.device))
        print(f"# repeat {rep + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    med = {cell: {k: statistics.median(s[k] for s in samples[cell]) for k in ("step_s", "cpu_s", "tokens")}
           for cell in cells}
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if args.device.startswith("cuda")
                        and k in torch.cuda.get_device_name(torch.device(args.device))), None)
    rows = []
    for m, p in cells:
        s, today = med[m, p], med[m, "today"]
        tok_s = s["tokens"] / s["step_s"]
        cuda = args.device.startswith("cuda")
        peak = (max(x["peak_mib"] for x in samples[m, p]) if cuda else
                traced_peak_mib(trainers[m, p], examples) if args.tensor_peak else float("nan"))
        mfu = (100 * step_flops(trainers[m, p].model, examples) / s["step_s"] / (peak_tflops * 1e12)
               if peak_tflops else float("nan"))
        rows.append({"method": m, "path": p, "step_s": s["step_s"],
                     "step_spread_pct": spread_pct([x["step_s"] for x in samples[m, p]]), "cpu_s": s["cpu_s"],
                     "tok_s": tok_s, "tok_s_x_today": tok_s / (today["tokens"] / today["step_s"]),
                     "cpu_speed_x_today": (s["tokens"] / s["cpu_s"]) / (today["tokens"] / today["cpu_s"]),
                     "step_x_lora": s["step_s"] / med["lora", p]["step_s"] if ("lora", p) in med else float("nan"),
                     "peak_mib": peak, "tokens": int(s["tokens"]), "mfu_pct": mfu,
                     "samples": samples[m, p]})
        r = rows[-1]
        print(f"{m:<12} {p:<9} step {r['step_s']:7.2f} s (spread {r['step_spread_pct']:3.0f}%, CPU {r['cpu_s']:.2f} s)  "
              f"{tok_s:8.1f} tok/s ({r['tok_s_x_today']:.3f}x today; by CPU time {r['cpu_speed_x_today']:.3f}x; "
              f"step {r['step_x_lora']:.3f}x LoRA)  peak {peak:8.1f} MiB", flush=True)
    return rows


def check_targets(rows: list[dict]) -> list[str]:
    """PASS/MISS per issue-13 target (LoRA and PARADE; PARADE's step against LoRA's on every path)."""
    cell = {(r["method"], r["path"]): r for r in rows}
    lines = []
    for what, path, op, bound in TARGETS:
        for m in ("lora", "parade"):
            if (m, path) in cell:
                ratio, by_cpu = cell[m, path]["tok_s_x_today"], cell[m, path]["cpu_speed_x_today"]
                lines.append(f"{'PASS' if ratio >= bound else 'MISS'}  {m} {what}: {ratio:.3f}x "
                             f"(target {op} {bound}; by CPU time {by_cpu:.3f}x)")
    for path in dict.fromkeys(r["path"] for r in rows):
        if ("parade", path) in cell and ("lora", path) in cell:
            ratio = cell["parade", path]["step_x_lora"]
            by_cpu = cell["parade", path]["cpu_s"] / cell["lora", path]["cpu_s"]
            lines.append(f"{'PASS' if ratio <= 1.0 else 'MISS'}  parade step time vs LoRA's, {path}: {ratio:.3f}x "
                         f"(target <= 1.0; by CPU time {by_cpu:.3f}x)")
    return lines


def profile(args, trainers: dict, examples: list[Encoded], methods: list[str], paths: list[str]) -> str:
    """Self time per op (ms per step; the least of 3 interleaved steps) of each (method, path), side by side."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    cells = [(m, p) for m in methods for p in paths]
    names = [f"{m}/{p}" for m, p in cells]
    times: dict[str, dict[str, float]] = {}
    for _ in range(3):
        for (m, p), name in zip(cells, names):
            with torch_profile(activities=acts) as prof:
                trainers[m, p].fit(examples, [])
            for ev in prof.key_averages():
                ms = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / 1e3
                per = times.setdefault(ev.key, {})
                per[name] = min(ms, per.get(name, ms))
    top = sorted(times, key=lambda k: -max(times[k].values()))[:args.profile_ops]
    lines = [f"# self {'device' if cuda else 'CPU'} ms per optimizer step, least of 3 interleaved steps",
             f"{'op':<44}" + "".join(f"{n:>22}" for n in names)]
    lines += [f"{k[:43]:<44}" + "".join(f"{times[k].get(n, 0):>22.1f}" for n in names) for k in top]
    lines.append(f"{'total':<44}" + "".join(f"{sum(t.get(n, 0) for t in times.values()):>22.1f}" for n in names))
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="smollm2_135m", help="configs/backbone/NAME.yaml (real weights)")
    ap.add_argument("--random-config", choices=sorted(RANDOM_SHAPES), help="random weights of a known shape")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="storage of the backbone as loaded (today's path)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="configs/method names, comma list")
    ap.add_argument("--precisions", default="fp32,bf16", help=f"new paths, comma list of {sorted(PRECISIONS)}")
    ap.add_argument("--task", default="copa", help="configs/task name whose training examples form the step")
    ap.add_argument("--seq-len", type=int, default=0, help="random examples of this many tokens instead of the task's")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step (the paper's 16)")
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-tensor-peak", dest="tensor_peak", action="store_false",
                    help="on CPU, skip the traced step that measures peak tensor memory")
    ap.add_argument("--profile", metavar="METHODS", help="per-op self times of these methods' paths (comma list)")
    ap.add_argument("--profile-ops", type=int, default=20)
    ap.add_argument("--note", default="", help="a line for the table header (e.g. how loaded the machine was)")
    ap.add_argument("--tag", default="", help="suffix of the table names (runs of other settings side by side)")
    ap.add_argument("--out", default=str(REPO / "results/bench"))
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.profile = [m for m in (args.profile or "").split(",") if m]
    unknown = sorted({m for m in args.methods + args.profile if not (config_group("method") / f"{m}.yaml").is_file()})
    if unknown:
        ap.error(f"unknown method(s) {unknown}: no configs/method/<name>.yaml")
    if set(args.profile) - set(args.methods):
        ap.error(f"--profile {args.profile}: profile only methods in --methods {args.methods}")
    bad = sorted(set(args.precisions) - set(PRECISIONS))
    if bad:
        ap.error(f"--precisions: {bad} not in {sorted(PRECISIONS)}")
    if args.random_config and not args.seq_len:
        args.seq_len = 512
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    specs = path_specs(args.precisions)
    paths = list(specs)
    trainers = build_trainers(args, args.methods, specs)
    vocab = trainers[args.methods[0], "today"].model.backbone.config.vocab_size
    examples = examples_for(args, vocab)
    name = args.random_config or args.backbone
    data = f"random {args.seq_len}-token examples" if args.seq_len else f"{args.task} training examples"
    label = f"{name}-{args.device.split(':')[0]}-" + (f"seq{args.seq_len}" if args.seq_len else args.task)
    print(f"# {label}: {len(examples)} {data} per step (micro-batch {args.micro_batch_size}), paths {paths}, "
          f"torch threads {torch.get_num_threads()}, repeats {args.repeats} (+{args.warmup} warm-up)", flush=True)
    rows = run(args, trainers, examples, args.methods, paths)
    targets = check_targets(rows)
    command = "python scripts/bench_train.py" + "".join(" " + shlex.quote(a) for a in argv)
    header = (f"Training step, {label}: {len(examples)} {data} per optimizer step, micro-batch "
              f"{args.micro_batch_size}; median of {args.repeats} interleaved steps (+{args.warmup} warm-up).\n"
              f"Made by `{command}` on {machine(args.device)}; load average {load_before:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after." + (f"\n{args.note}" if args.note else "")
              + "".join("\n" + t for t in targets))
    stem = Path(args.out) / (f"train-{label}" + (f"-{args.tag}" if args.tag else ""))
    text = profile(args, trainers, examples, args.profile, paths) if args.profile else None
    save_run(stem, rows, header, args, targets, COLUMNS, text, command)
    print("\n".join(targets + [f"wrote {stem}.{{md,csv,tex,json}}"]))
    if text is not None:
        print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
