"""Multi-tenant generation speed and memory, the setting of PARADE Table 4 (App. F prompt, 32 new tokens).

    python scripts/bench_multitenant.py                         # SmolLM2-135M, batch 1/8, tenants 1/8, beams 1/3
    python scripts/bench_multitenant.py --random-config llama2_7b --dtype bfloat16    # the paper's shape, GPU
    python scripts/bench_multitenant.py --batch-sizes 8 --tenants 8 --repeats 2 --new-tokens 8   # a quick check
    python scripts/bench_multitenant.py --profile bare,parade,lora_gathered   # where the time goes, per op

Every method serves a batch through `MultiTenantEngine` on one frozen backbone; row i
belongs to tenant i % tenants (random adapter weights of the right shapes, saved and
loaded like real ones: speed does not depend on values). Methods: bare backbone, PARADE,
PARA, PEDRO, (IA)3, LoRA through peft's mixed batch (`adapter_names`; its own copy of the
backbone), gathered (BGMV-style) LoRA, LoPA (its encoder makes each request's soft
prompt when the call starts: inside the prefill time).

prefill = wall time from the call to the end of its first forward; decode tok/s =
rows x (new - 1) / time after the prefill; exactly `--new-tokens` are generated.
Memory = the method's resident weights (backbone + its tenants') + the call's peak
extra: `peak` is torch.cuda.max_memory_allocated on CUDA and the process's peak RSS on
CPU (VmHWM reset after malloc_trim: allocator effects included); `tensors` is the peak
of live tensor storages (= peak on CUDA; on CPU exact, from one extra untimed traced
run per method, slow, so only at batch 8 with 8 tenants), which the memory targets use.
Each cell: median of `--repeats` runs after `--warmup`; methods interleaved (A B C ..., then reversed) so drift cancels in the
ratios to the bare backbone of the same run; spread = (max - min) / median.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from papeft.backbone.loading import DTYPES, architecture_config, backbone_config, load_backbone, load_tokenizer
from papeft.tasks.prompting import PromptFormatter
from papeft.serving import MultiTenantEngine, Request
from papeft.bench.tables import TARGETS_AT, check_targets, machine, notes, rerender, save_run, spread_pct
from papeft.serving.memory import PeakMemory, TensorPeak, sync
from papeft.bench.profiling import op_profile
from papeft.bench.tenants import random_adapter

REPO = Path(__file__).resolve().parents[1]
# PARADE Appendix F: the example instruction used for the efficiency analysis (Table 4)
APP_F_INSTRUCTION = (
    "Generate a blog post of 500 words or less that discusses the following news article:\n\n"
    "The Department of Child Protection (DCP) must pay compensation and medical expenses to a youth "
    "worker who developed pericarditis after getting a Covid booster under a workplace vaccination "
    "directive, the South Australian Employment Tribunal has ruled.\n\n"
    "In a decision handed down on 15 January 2024, the Tribunal determined that Daniel Shepherd's "
    "employment was \"a significant contributing cause\" to his injury, which has since rendered him "
    "incapable of performing his role at work.\n\n"
    "Shepherd got a Covid booster in February 2022 as a requirement for his ongoing employment with the "
    "DCP. The DCP admitted that Shepherd's pericarditis had been caused by the booster, but denied "
    "responsibility for the injury, arguing that it did not arise from Shepherd's employment, but from "
    "a lawful State Government Public Health Order (PHO), issued under the Emergency Management Act 2004 (EMA).")
PAPER_PROMPT_TOKENS = 274        # LLaMA-2 tokens of the instruction with LoRA (App. F)
RANDOM_SHAPES = {   # besides every configs/backbone shape (papeft.backbone.loading.architecture_config)
    "tiny_llama": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # tests
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
# method -> (configs/method yaml or None, engine: "main" | "peft")
METHODS = {"bare": (None, "main"), "parade": ("parade", "main"), "para": ("para", "main"),
           "pedro": ("pedro", "main"), "ia3": ("ia3", "main"), "lora_peft": ("lora", "peft"),
           "lora_gathered": ("lora", "main"), "lopa": ("lopa", "main")}


# ---- backbone, prompt, tenants ------------------------------------------------
def backbone_and_prompt(args) -> tuple[nn.Module, list[int], str]:
    """(backbone in eval mode on the device, prompt ids, label)."""
    smol = backbone_config("smollm2_135m")
    if args.random_config:
        name = args.random_config
        config = RANDOM_SHAPES.get(name) or architecture_config(backbone_config(name))
        dtype = DTYPES[args.dtype or "float32"]
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        cfg = smol                                                    # tokenizer and template for the prompt
    else:
        name = args.backbone
        cfg = backbone_config(name)
        if args.dtype:
            cfg["dtype"] = args.dtype
        model, _ = load_backbone(cfg)
        model = model.to(args.device)
    try:
        tok = load_tokenizer(cfg)
        formatter = PromptFormatter(tok, cfg.get("chat_template", "auto"), cfg.get("system_prompt"))
        ids = formatter.encode_prompt(APP_F_INSTRUCTION)
    except (OSError, ValueError) as e:              # no tokenizer files here: the length is what matters
        print(f"# no tokenizer ({type(e).__name__}: {e}); using {PAPER_PROMPT_TOKENS} synthetic prompt ids")
        tok, ids = None, list(range(1, PAPER_PROMPT_TOKENS + 1))
    n = args.prompt_tokens or (PAPER_PROMPT_TOKENS if args.random_config else len(ids))
    ids = [t % model.config.vocab_size for t in (ids * (n // len(ids) + 1))[:n]]
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = (tok.pad_token_id if tok is not None else None) or 0
    return model.eval(), ids, f"{name}-{args.device}-{str(model.dtype).removeprefix('torch.')}"


# ---- measurement ----------------------------------------------------------------
def generate_fixed(engine: MultiTenantEngine, requests: list[Request], args, beams: int) -> list:
    """One measured call: exactly `--new-tokens` new tokens per row."""
    return engine.generate(requests, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=beams)


def tensor_peak_extra(engine: MultiTenantEngine, requests: list[Request], args, beams: int) -> int:
    existing = list(engine.backbone.parameters()) + list(engine.backbone.buffers())
    existing += [t for bank in engine.banks.values() for t in bank.tensors()]
    with TensorPeak(existing) as tracker:
        generate_fixed(engine, requests, args, beams)
    return tracker.peak


def measure(engine: MultiTenantEngine, requests: list[Request], resident: int, args, beams: int) -> dict:
    t = {}

    def first_forward_done(module, a, out):
        if "prefill" not in t:
            sync(args.device)
            t["prefill"] = time.perf_counter()
    handle = engine.backbone.register_forward_hook(first_forward_done)
    mem = PeakMemory(args.device)
    mem.start()
    try:
        sync(args.device)
        t0 = time.perf_counter()
        results = generate_fixed(engine, requests, args, beams)
        sync(args.device)
        t1 = time.perf_counter()
    finally:
        handle.remove()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    rows = len(requests)
    return {"prefill_ms": 1e3 * (t["prefill"] - t0),
            "decode_tok_s": rows * (args.new_tokens - 1) / (t1 - t["prefill"]),
            "total_tok_s": rows * args.new_tokens / (t1 - t0),
            "peak_mib": (resident + mem.extra()) / 2**20}


def make_requests(method: str, batch: int, tenants: int, ids: list[int]) -> list[Request]:
    if method == "bare":
        return [Request(ids) for _ in range(batch)]
    return [Request(ids, f"{method}-{i % tenants}") for i in range(batch)]


def make_jobs(engines, methods: list[str], batch: int, tenants: int, ids: list[int]) -> dict:
    """method -> (the engine serving it, its requests)."""
    return {m: (engines[METHODS[m][1]], make_requests(m, batch, tenants, ids)) for m in methods}


def resident_bytes(engine: MultiTenantEngine, method: str) -> int:
    names = {n for n in engine.tenants if n.startswith(f"{method}-")}
    return engine.weight_bytes(names)


def profile(engines, methods: list[str], ids, args, batch: int, tenants: int, beams: int) -> str:
    """Self time per op of each method's call, side by side (papeft.bench.profiling): where its extra time goes."""
    jobs = make_jobs(engines, methods, batch, tenants, ids)
    workloads = {m: (lambda e=e, reqs=reqs: generate_fixed(e, reqs, args, beams)) for m, (e, reqs) in jobs.items()}
    return op_profile(workloads, f"batch {batch}, tenants {tenants}, beams {beams}, {args.new_tokens} new tokens",
                      cuda=args.device.startswith("cuda"))


# ---- main -------------------------------------------------------------------------
def build_engines(backbone: nn.Module, methods: list[str], tenants: int) -> dict[str, MultiTenantEngine]:
    """"main" (every method but peft's LoRA) and "peft" (its own copy of the backbone), tenants loaded."""
    engines = {"main": MultiTenantEngine(backbone)}
    if "lora_peft" in methods:
        engines["peft"] = MultiTenantEngine(copy.deepcopy(backbone), lora_backend="peft")
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            yaml, which = METHODS[m]
            for k in range(tenants if yaml else 0):
                d = random_adapter(backbone.config, yaml, seed=k, directory=Path(tmp) / f"{m}-{k}")
                engines[which].add_tenant(f"{m}-{k}", d)
    return engines


def run_cell(engines, methods, ids, args, batch: int, tenants: int, beams: int) -> list[dict]:
    """One (batch, tenants, beams) cell: warm-up, interleaved repeats, medians and ratios to bare."""
    jobs = make_jobs(engines, methods, batch, tenants, ids)
    resident = {m: resident_bytes(e, m) for m, (e, _) in jobs.items()}
    samples = {m: [] for m in methods}
    for _ in range(args.warmup):
        for m, (e, reqs) in jobs.items():
            measure(e, reqs, resident[m], args, beams)
    for rep in range(args.repeats):
        for m in (methods if rep % 2 == 0 else methods[::-1]):          # A B C ..., then C B A ...
            e, reqs = jobs[m]
            samples[m].append(measure(e, reqs, resident[m], args, beams))
    med = {m: {k: statistics.median(s[k] for s in samples[m]) for k in samples[m][0]} for m in methods}
    trace = args.tensor_peak and (batch, tenants) == TARGETS_AT       # tracing is slow: target cells only
    for m, (e, reqs) in jobs.items():        # CUDA's allocator peak is already exact; on CPU trace one run
        med[m]["tensor_peak_mib"] = (med[m]["peak_mib"] if args.device.startswith("cuda") else
                                     (resident[m] + tensor_peak_extra(e, reqs, args, beams)) / 2**20 if trace
                                     else float("nan"))
    rows = []
    for m in methods:
        rows.append({"batch": batch, "tenants": tenants, "beams": beams, "method": m, **med[m],
                     "prefill_x_bare": med[m]["prefill_ms"] / med["bare"]["prefill_ms"],
                     "prefill_spread_pct": spread_pct([s["prefill_ms"] for s in samples[m]]),
                     "decode_x_bare": med[m]["decode_tok_s"] / med["bare"]["decode_tok_s"],
                     "decode_spread_pct": spread_pct([s["decode_tok_s"] for s in samples[m]]),
                     "peak_x_bare": med[m]["peak_mib"] / med["bare"]["peak_mib"],
                     "tensor_peak_x_bare": med[m]["tensor_peak_mib"] / med["bare"]["tensor_peak_mib"],
                     "samples": samples[m]})
        print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    print(f"B={r['batch']:<3} tenants={r['tenants']:<3} beams={r['beams']} {r['method']:<14} "
          f"prefill {r['prefill_ms']:9.1f} ms ({r['prefill_x_bare']:.3f}x, spread {r['prefill_spread_pct']:.0f}%)  "
          f"decode {r['decode_tok_s']:8.1f} tok/s ({r['decode_x_bare']:.3f}x, spread {r['decode_spread_pct']:.0f}%)  "
          f"peak {r['peak_mib']:7.1f} MiB ({r['peak_x_bare']:.3f}x), tensors {r['tensor_peak_mib']:7.1f} MiB "
          f"({r['tensor_peak_x_bare']:.3f}x)", flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="smollm2_135m", help="configs/backbone/NAME.yaml (real weights)")
    ap.add_argument("--random-config", help=f"random weights of a known shape: {sorted(RANDOM_SHAPES)} "
                                            "or a configs/backbone name (llama2_7b, smollm2_135m, ...)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: the backbone config's (float32 if random)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--tenants", default="1,8")
    ap.add_argument("--beams", default="1,3")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="crop/tile the prompt to N tokens (0: as encoded; "
                    f"{PAPER_PROMPT_TOKENS} with --random-config)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", metavar="METHODS", help="after the table, per-op self times (least of 3 calls) of "
                    "these methods (comma list) at the largest batch/tenants and the last beam count")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-tensor-peak", dest="tensor_peak", action="store_false",
                    help="on CPU, skip the traced run that measures the exact tensor peak (target cells only)")
    ap.add_argument("--out", default=str(REPO / "results/bench"))
    ap.add_argument("--rerender", metavar="JSON", help="only rewrite the tables of a saved run from its .json")
    args = ap.parse_args(argv)
    args.methods = ["bare"] + [m for m in args.methods.split(",") if m and m != "bare"]
    args.profile = [m for m in (args.profile or "").split(",") if m]
    unknown = sorted(set(args.methods + args.profile) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    for key in ("batch_sizes", "tenants", "beams"):
        setattr(args, key, [int(x) for x in getattr(args, key).split(",")])
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.rerender:
        paths = rerender(Path(args.rerender))
        print(f"wrote {', '.join(map(str, paths.values()))} from {args.rerender}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone, ids, label = backbone_and_prompt(args)
    engines = build_engines(backbone, list(dict.fromkeys(args.methods + args.profile)), max(args.tenants))
    print(f"# {label}: prompt {len(ids)} tokens, {args.new_tokens} new, torch threads {torch.get_num_threads()}, "
          f"methods {args.methods}, repeats {args.repeats} (+{args.warmup} warm-up)")
    rows = [row for batch in args.batch_sizes for tenants in args.tenants if tenants <= batch
            for beams in args.beams for row in run_cell(engines, args.methods, ids, args, batch, tenants, beams)]
    targets = check_targets(rows)
    note = notes(targets)
    command = "python scripts/bench_multitenant.py" + "".join(" " + shlex.quote(a) for a in argv)
    header = (f"Multi-tenant generation, {label}: App. F prompt ({len(ids)} tokens), {args.new_tokens} new tokens, "
              f"median of {args.repeats} interleaved runs.\nMade by `{command}` on {machine(args.device)}.\n{note}"
              + "".join("\n" + t for t in targets))
    stem = Path(args.out) / f"multitenant-{label}"
    text = (profile(engines, args.profile, ids, args, max(args.batch_sizes), max(args.tenants), args.beams[-1])
            if args.profile else None)
    save_run(stem, rows, header, args, targets, profile=text, command=command)
    print("\n".join([note] + targets + [f"wrote {stem}.{{md,csv,tex,json}}"]))
    if text is not None:
        print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
