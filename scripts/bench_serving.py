"""Serving under load: throughput and latency against arrival rate, many tenants, one backbone.

    python scripts/bench_serving.py                                  # SmolLM2-135M, the full grid (~1.5 h)
    python scripts/bench_serving.py --settings 64:zipf --rates 1,2 --requests 20     # a quick look
    python scripts/bench_serving.py --backbone tiny_llama --settings 4:zipf --rates 4 --requests 6 --tenants 4

Each server is `python -m papeft.serving` in its own process on 127.0.0.1 (iteration-level
batching, `--max-rows` rows): the bare backbone, PARADE, (IA)3, gathered (BGMV-style) LoRA and
peft's mixed-batch LoRA, each with `--tenants` tenants of random adapter weights of its method's
shapes (configs/method; speed does not depend on the values). Requests come from a fixed,
seeded trace (papeft.bench.load): Poisson arrivals at each rate, tenants uniform or
Zipf-skewed, prompts and answer lengths from the E2E test set (the chat template applied,
answer length = the first reference's tokens, every server made to produce exactly that many).
Per setting and rate the servers replay the same trace in turn, their order reversed at every
rate. After the timed runs, a seeded sample of each run's answers is compared with the offline
engine (`MultiTenantEngine.generate`, the request alone) in this process. Stopped midway, the same
command on the same machine resumes from the last finished rate (papeft.bench.serving_runs.RunStore).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from papeft.backbone.loading import DTYPES, backbone_config, load_backbone, load_random_weights
from papeft.bench.load import free_port, make_trace, run_replay, summarise
from papeft.bench.profiling import op_profile
from papeft.bench.serving_runs import RunStore, targets
from papeft.bench.tables import machine, save_run
from papeft.report.provenance import code_commit
from papeft.bench.tenants import random_adapter
from papeft.serving import ContinuousBatcher, Job, MultiTenantEngine, Request
from papeft.tasks import get_task
from papeft.tasks.prompting import PromptFormatter

REPO = Path(__file__).resolve().parents[1]
AUTO_FRACTIONS = (0.3, 0.5, 0.65, 0.75, 0.85, 0.95, 1.05, 1.2)      # finer where servers saturate
SERVERS = {"bare": (None, "gathered"), "parade": ("parade", "gathered"), "ia3": ("ia3", "gathered"),
           "lora_gathered": ("lora", "gathered"), "lora_peft": ("lora", "peft")}   # name -> (method yaml, backend)
COLUMNS = ["tenants", "popularity", "server", "offered_rps", "arrival_rps", "lag_p99_ms", "requests", "answered",
           "rejected", "timed_out", "failed", "req_s", "tok_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms",
           "e2e_p99_ms", "checked", "mismatched"]


def e2e_examples(tok, cfg: dict, data_root: str, max_answer: int) -> list[tuple[list[int], int]]:
    """(prompt ids, answer tokens) of every E2E test MR: its prompt as served, its first reference's length."""
    test = get_task("e2e").load({"name": "e2e"}, data_root).test
    fmt = PromptFormatter(tok, cfg.get("chat_template", "auto"), cfg.get("system_prompt"))
    return [(fmt.encode_prompt(ex.prompt), min(max_answer, len(tok(ex.response, add_special_tokens=False)
                                                              ["input_ids"]) + 1)) for ex in test]


def backbone(args):
    """(model, tokenizer) as the servers load it: the weights, or `--random-weights` of its shape."""
    cfg = backbone_config(args.backbone)
    if args.dtype:
        cfg["dtype"] = args.dtype
    return load_random_weights(cfg) if args.random_weights else load_backbone(cfg)


def start_server(name: str, args, tenants_dir: Path | None, log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "papeft.serving", "--backbone", args.backbone, "--port", str(port),
           "--lora-backend", SERVERS[name][1], "--max-rows", str(args.max_rows), "--max-waiting",
           str(args.max_waiting), "--device", args.device] + (["--tenants", str(tenants_dir)] if tenants_dir else [])
    cmd += (["--random-weights"] if args.random_weights else []) + (["--dtype", args.dtype] if args.dtype else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = open(log_dir / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, name: str, log_dir: Path, timeout: float = 600) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server {name} exited ({proc.returncode}): see {log_dir / (name + '.log')}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"server {name} not ready after {timeout:.0f} s")


def wait_idle(proc: subprocess.Popen, url: str, name: str, timeout: float = 300) -> None:
    """Until the server has nothing waiting or running (a timed-out run's requests were cancelled by their
    disconnect and leave at the next step): the next run never shares it. Raises if it died or stays busy."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} exited ({proc.returncode}) during the runs")
        h = httpx.get(f"{url}/health", timeout=5).json()
        if h["waiting"] == 0 and h["running"] == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"server {name} still busy {timeout:.0f} s after a run")


def offline_engines(args, dirs: dict[str, Path]) -> dict[str, MultiTenantEngine]:
    """The reference: each server's tenants in an in-process engine (peft's LoRA on its own backbone copy)."""
    model, tok = backbone(args)
    main = MultiTenantEngine(model.to(args.device), tokenizer=tok)
    peft = MultiTenantEngine(copy.deepcopy(main.backbone), lora_backend="peft") if "lora_peft" in args.servers else None
    engines = {}
    for name in args.servers:
        yaml, backend = SERVERS[name]
        engines[name] = peft if backend == "peft" else main
        for d in sorted(dirs[name].iterdir()) if yaml else []:
            engines[name].add_tenant(f"{name}/{d.name}", d)
    return engines


def probe_rates(url: str, examples, model: str, args) -> tuple[list[float], float]:
    """(rates, saturated req/s): every probe request arrives at once; the grid is fractions of what was served."""
    trace = make_trace(examples, args.probe_requests, 1e4, 1, "uniform", seed=args.seed + 1)
    outcomes, _ = run_replay(url, trace, lambda k: model, args.drain)
    capacity = summarise(outcomes, 1e4)["req_s"]
    if not capacity > 0:
        raise SystemExit("the saturation probe got no answer: see the bare server's log")
    return sorted({float(f"{f * capacity:.3g}") for f in AUTO_FRACTIONS}), capacity


def check_sample(engine: MultiTenantEngine, server: str, sample: list[dict]) -> int:
    """How many of a run's sampled answers (papeft.bench.serving_runs) the offline engine, given each
    request alone, answers otherwise. Exact tokens: in fp32 on a CPU a row's logits do not depend on its
    batch beyond rounding, which flips no argmax here; in bf16 on a GPU a near-tie may flip and count."""
    bad = 0
    for answer in sample:
        tenant = None if server == "bare" else f"{server}/{tenant_name(answer['tenant'])}"
        n = len(answer["tokens"])
        ref = engine.generate([Request(list(answer["prompt"]), tenant)], max_new_tokens=n, min_new_tokens=n)[0]
        bad += ref.tokens != answer["tokens"]
    return bad


def tenant_name(rank: int) -> str:
    return f"t{rank:03d}"


def model_of(server: str, args):
    """Popularity rank -> the `model` a request names: the bare server answers to the backbone's name."""
    return (lambda rank: Path(args.backbone).stem) if server == "bare" else tenant_name


def profile(engines: dict[str, MultiTenantEngine], examples, args) -> str:
    """Per-op self time of each server's batcher on one fixed burst (2 x --max-rows requests of the first
    setting's trace, all submitted at once, run until idle), in this process: where each one's time goes."""
    n, pop = args.settings[0]
    burst = make_trace(examples, 2 * args.max_rows, 1.0, n, pop, seed=args.seed)

    def workload(server: str):
        def run():
            batcher = ContinuousBatcher(engines[server], max_rows=args.max_rows)
            for a in burst:
                tenant = None if server == "bare" else f"{server}/{tenant_name(a.tenant)}"
                batcher.submit(Job(Request(list(a.prompt), tenant), max_new_tokens=a.answer_tokens,
                                   min_new_tokens=a.answer_tokens))
            batcher.run_until_idle()
        return run
    title = (f"{len(burst)} requests of the {n}-tenant {pop} trace submitted at once, the batcher run until idle "
             f"(max {args.max_rows} rows), {sum(a.answer_tokens for a in burst)} new tokens in all")
    return op_profile({s: workload(s) for s in args.servers}, title, cuda=args.device.startswith("cuda"))


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = sorted({(r["tenants"], r["popularity"]) for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False, sharey=True)
    for ax, (n, pop) in zip(axes[0], settings):
        for server in SERVERS:
            mine = sorted((r for r in rows if r["server"] == server and (r["tenants"], r["popularity"]) == (n, pop)),
                          key=lambda r: r["offered_rps"])
            if mine:
                line, = ax.plot([r["offered_rps"] for r in mine], [r["e2e_p99_ms"] / 1e3 for r in mine], "o-",
                                label=f"{server} p99")
                ax.plot([r["offered_rps"] for r in mine], [r["e2e_p50_ms"] / 1e3 for r in mine], ":",
                        color=line.get_color())
        ax.set(title=f"{n} tenants, {pop}", xlabel="offered load (requests/s)", yscale="log")
    axes[0][0].set_ylabel("end-to-end latency (s): p99 solid, p50 dotted")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    plt.close(fig)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="smollm2_135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--random-weights", action="store_true", help="the backbone's published shape with random "
                    "weights (e.g. --backbone llama2_7b --dtype bfloat16 on a GPU)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: the backbone config's")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--tenants", type=int, default=64, help="tenants loaded per server (the settings use the first N)")
    ap.add_argument("--settings", default="64:zipf,8:zipf,64:uniform,8:uniform", help="tenants:popularity list")
    ap.add_argument("--rates", default="auto", help="offered requests per second (comma list), or auto: fractions "
                    f"{AUTO_FRACTIONS} of the bare server's saturated throughput, probed first")
    ap.add_argument("--probe-requests", type=int, default=64, help="requests of the saturation probe (--rates auto)")
    ap.add_argument("--requests", type=int, default=60, help="requests per run (the trace's length)")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds after the last arrival before a run ends")
    ap.add_argument("--max-answer", type=int, default=64, help="answer tokens at most (E2E's task budget)")
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--max-waiting", type=int, default=256)
    ap.add_argument("--check", type=int, default=3, help="answers per run compared with the offline engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=None, help="untimed requests per server, all at once, before "
                    "the runs: every server warmed alike on full batches (default: --max-rows)")
    ap.add_argument("--profile", action="store_true", help="after the runs, per-op self times of each server's "
                    "batcher on one burst, in this process (<stem>-profile.txt)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per server (0: torch's default)")
    ap.add_argument("--data-root", default=os.environ.get("PAPEFT_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--out", default=str(REPO / "results/bench"))
    args = ap.parse_args(argv)
    args.warmup = args.max_rows if args.warmup is None else args.warmup
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown:
        ap.error(f"unknown server(s) {unknown}; known: {list(SERVERS)}")
    args.rates = None if args.rates == "auto" else sorted(float(r) for r in args.rates.split(","))
    args.settings = [(int(n), pop) for n, pop in (s.split(":") for s in args.settings.split(","))]
    if any(n > args.tenants for n, _ in args.settings):
        ap.error(f"a setting asks for more tenants than --tenants={args.tenants}")
    return args


def measure(args, examples, dirs: dict[str, Path], tmp: Path, store: RunStore) -> None:
    """The servers as processes: warm-up, the saturation probe (--rates auto, once per store), then every
    (setting, rate) the store lacks, each server replaying the same trace in turn; stopped afterwards."""
    procs = {name: start_server(name, args, dirs[name] if SERVERS[name][0] else None, tmp) for name in args.servers}
    try:
        for name, (proc, url) in procs.items():
            wait_ready(proc, url, name, tmp)
        for name, (_, url) in procs.items() if args.warmup else ():      # first calls are slow: not timed
            warm = make_trace(examples, args.warmup, 1e4, args.tenants, "uniform", seed=99)   # all at once
            run_replay(url, warm, model_of(name, args), args.drain)
            wait_idle(procs[name][0], url, name)
        if store.rates is None and args.rates is None:
            reference = "bare" if "bare" in procs else args.servers[0]
            rates, probed = probe_rates(procs[reference][1], examples, model_of(reference, args)(0), args)
            wait_idle(*procs[reference], reference)
            store.set_rates(rates, probed)
            print(f"# saturation probe ({reference}, {args.probe_requests} requests at once): {probed:.2f} req/s; "
                  f"rates {rates}", flush=True)
        elif store.rates is None:
            store.set_rates(args.rates, None)
        for n, pop in args.settings:
            for i, rate in enumerate(store.rates):
                if store.has(n, pop, rate):
                    continue
                trace = make_trace(examples, args.requests, rate, n, pop, seed=args.seed)
                rows, kept = [], []
                for name in (args.servers if i % 2 == 0 else args.servers[::-1]):
                    url = procs[name][1]
                    outcomes, wall = run_replay(url, trace, model_of(name, args), args.drain)
                    wait_idle(procs[name][0], url, name)
                    rows.append(r := {"tenants": n, "popularity": pop, "server": name, **summarise(outcomes, rate),
                                      "checked": 0, "mismatched": 0})
                    kept.append(outcomes)
                    print(f"{n:>3} {pop:<8} {rate:>5g} req/s {name:<14} answered {r['answered']}/{r['requests']} "
                          f"{r['tok_s']:7.1f} tok/s  ttft p50/p99 {r['ttft_p50_ms']:7.0f}/{r['ttft_p99_ms']:7.0f} ms"
                          f"  e2e p50/p99 {r['e2e_p50_ms']:7.0f}/{r['e2e_p99_ms']:7.0f} ms  ({wall:.0f} s)", flush=True)
                store.add(rows, kept, args.check, args.seed)
    except BaseException:
        if store.rows:
            print(f"# {len(store.rows)} runs kept in {store.path}: the same command resumes from there", flush=True)
        raise
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cfg = backbone_config(args.backbone)
    model, tok = backbone(args)
    vocab = model.config.vocab_size                                      # a random paper shape may be smaller
    examples = [([t % vocab for t in ids], n) for ids, n in e2e_examples(tok, cfg, args.data_root, args.max_answer)]
    label = f"{args.backbone}-{args.device}" + ("-random" if args.random_weights else "") + \
        (f"-{args.dtype}" if args.dtype else "")
    stem = Path(args.out) / f"serving-{label}"
    store = RunStore(stem, {**{k: v for k, v in vars(args).items() if k not in ("out", "data_root", "profile")},
                            "machine": machine(args.device, threads=not args.threads)}, code_commit())
    if store.rows:
        print(f"# resuming from {store.path}: {len(store.rows)} runs done", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serving-"))
    dirs = {}
    for name in args.servers:
        yaml = SERVERS[name][0]
        dirs[name] = tmp / name
        for k in range(args.tenants if yaml else 0):
            random_adapter(model.config, yaml, seed=k, directory=dirs[name] / tenant_name(k))
    del model
    if store.rates is None or not all(store.has(n, pop, r) for n, pop in args.settings for r in store.rates):
        measure(args, examples, dirs, tmp, store)
    engines = offline_engines(args, dirs)                                 # untimed: the servers are gone
    rows = store.rows
    for row, sample in zip(rows, store.samples):
        row["checked"], row["mismatched"] = len(sample), check_sample(engines[row["server"]], row["server"], sample)
    command = "python scripts/bench_serving.py" + "".join(" " + shlex.quote(a) for a in argv)
    result = [t for setting in args.settings for t in targets(rows, setting)]
    probed = store.probed
    grid = (f"rates {store.rates} req/s = {AUTO_FRACTIONS} x the bare server's saturated throughput "
            f"({probed:.2f} req/s, {args.probe_requests} requests at once)" if probed else f"rates {store.rates} req/s")
    weights = "random weights (seed 0), prompt ids modulo the vocabulary; " if args.random_weights else ""
    commits = sorted({str(r["commit"]) for r in rows})
    header = (f"Serving under load, {label}: iteration-level batching (max {args.max_rows} rows), {args.requests} "
              f"requests per run (its p99 is close to its slowest), Poisson arrivals, E2E test prompts and answer "
              f"lengths ({len(examples)} MRs; median "
              f"{statistics.median(len(p) for p, _ in examples):g} prompt and "
              f"{statistics.median(n for _, n in examples):g} answer tokens); servers replay the same "
              f"seeded trace in turn; {grid}; {weights}server torch threads {args.threads or 'default'}.\n"
              f"Made by `{command}` on {machine(args.device)} (this process), papeft {', '.join(commits)}.\n"
              "sustained = the highest offered rate up to which every request was answered and p99 end-to-end "
              "latency met one objective for all servers of a setting, 3x the bare backbone's p99 at the lowest "
              "rate (where p99 crosses it between two rates, interpolated on log latency).\n" + "\n".join(result))
    text = profile(engines, examples, args) if args.profile else None
    save_run(stem, rows, header, args, result, columns=COLUMNS, profile=text, command=command)
    plot(rows, stem.with_suffix(".png"), f"Serving under load, {label}, {machine(args.device).split(',')[0]}")
    store.remove()
    print("\n".join(result + [f"wrote {stem}.{{md,csv,tex,json,png}}"]))
    shutil.rmtree(tmp, ignore_errors=True)                              # adapters and server logs (kept on failure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
