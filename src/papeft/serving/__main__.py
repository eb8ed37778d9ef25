"""`python -m papeft.serving`: serve a backbone and a directory of tenant adapters on a local port.

    python -m papeft.serving --tenants results/tenants --port 8000          # SmolLM2-135M, every subdirectory a tenant
    curl -s localhost:8000/v1/models
    curl -s localhost:8000/v1/completions -d '{"model": "acme", "prompt": "Is it good?", "max_tokens": 8}'

Each subdirectory of `--tenants` holding an `adapter_config.json` is loaded as a tenant named
after it; one that is refused is logged with the reason (and listed by GET /v1/tenants), the
others are served. The bare backbone answers to its config name (`--backbone`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from aiohttp import web

from papeft.backbone.loading import DTYPES, backbone_config, load_backbone, load_random_weights
from papeft.methods.base import ADAPTER_CONFIG
from papeft.serving.api import make_app
from papeft.serving.continuous import ContinuousBatcher
from papeft.serving.engine import MultiTenantEngine
from papeft.serving.tenants import TenantError

log = logging.getLogger("papeft.serving")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m papeft.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="smollm2_135m", help="a config under configs/backbone, or a .yaml path")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="override the backbone config's dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random-weights", action="store_true", help="the backbone's published shape with random "
                   "weights (seed 0) and SmolLM2's tokenizer: speed at a paper scale (llama2_7b) without its weights")
    p.add_argument("--tenants", type=Path, default=None, help="directory of adapter directories, one per tenant")
    p.add_argument("--lora-backend", choices=["gathered", "peft"], default="gathered")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (loopback unless you mean it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-rows", type=int, default=32, help="rows in the running batch (a request takes num_beams)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    p.add_argument("--max-prefill-rows", type=int, default=8, help="prompts prefilled together per iteration")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def load_tenants(batcher: ContinuousBatcher, root: Path) -> None:
    if not root.is_dir():
        raise SystemExit(f"--tenants {root}: not a directory")
    for d in sorted(p for p in root.iterdir() if (p / ADAPTER_CONFIG).is_file()):
        try:
            batcher.add_tenant(d.name, d)
            log.info("tenant %s: %s", d.name, batcher.engine.tenants[d.name].method)
        except TenantError as e:
            log.warning("tenant %s refused: %s", d.name, e)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = backbone_config(args.backbone)
    if args.dtype:
        cfg["dtype"] = args.dtype
    model, tok = load_random_weights(cfg) if args.random_weights else load_backbone(cfg)
    engine = MultiTenantEngine(model.to(args.device), lora_backend=args.lora_backend, tokenizer=tok)
    batcher = ContinuousBatcher(engine, max_rows=args.max_rows, max_waiting=args.max_waiting,
                                max_prefill_rows=args.max_prefill_rows)
    if args.tenants is not None:
        load_tenants(batcher, args.tenants)
    app = make_app(batcher, tok, Path(args.backbone).stem, args.tenants, cfg.get("chat_template", "auto"),
                   cfg.get("system_prompt"), max_new_tokens=args.max_new_tokens,
                   max_prompt_tokens=args.max_prompt_tokens)
    web.run_app(app, host=args.host, port=args.port, handler_cancellation=True,
                print=lambda msg: log.info("%s (tenants: %d)", msg, len(engine.tenants)))


if __name__ == "__main__":
    main()
