"""Every malformed adapter directory (config, tensors, values) is a TenantError naming the directory and
the cause; its requests alone are refused; weights that would make outputs meaningless never serve."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from papeft.serving import MultiTenantEngine, Request, TenantError
from papeft.methods.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from test_engine import NEW, adapter, backbone, prompts


def edit_config(change):
    def apply(d):
        meta = json.loads((d / ADAPTER_CONFIG).read_text())
        change(meta)
        (d / ADAPTER_CONFIG).write_text(json.dumps(meta))
    return apply


def edit_state(change):
    def apply(d):
        state = load_file(str(d / ADAPTER_WEIGHTS))
        save_file({k: change(v) for k, v in state.items()}, str(d / ADAPTER_WEIGHTS))
    return apply


def write_config(raw: bytes):
    return lambda d: (d / ADAPTER_CONFIG).write_bytes(raw)


BROKEN = {   # name: (method it was saved from, how it is broken, words the refusal must hold)
    "method_a_list": ("lora", edit_config(lambda m: m.update(method=["lora"])), "expected a string"),
    "config_a_list": ("lora", edit_config(lambda m: m.update(config=[4])), "config list"),
    "config_not_utf8": ("lora", write_config(b"\xff\xfe{}"), "no readable adapter_config.json"),
    "rank_negative": ("lora", edit_config(lambda m: m["config"].update(r=-1)), "method.r=-1"),
    "alpha_nan": ("lora", edit_config(lambda m: m["config"].update(alpha=float("nan"))), "method.alpha=nan"),
    "pooler_a_number": ("parade", edit_config(lambda m: m["config"].update(pooler=3)), "method.pooler=3"),
    "capsules_zero": ("parade", edit_config(lambda m: m["config"].update(num_capsules=0)), "method.num_capsules=0"),
    "integer_tensors": ("lora", edit_state(lambda t: t.round().to(torch.int64)), "not floating point"),
    "bool_scales": ("ia3_peft", edit_state(lambda t: t > 1), "not floating point"),
    "infinite": ("parade", edit_state(lambda t: t.clone().fill_(float("inf"))), "non-finite"),
    "lora_overflows": ("lora", edit_state(lambda t: t * 1e30), "not finite"),
    "vectors_overflow": ("parade", edit_state(lambda t: t * 1e20), "not finite"),
}


def test_every_malformed_adapter_is_refused_alone(tmp_path):
    engine = MultiTenantEngine(backbone())
    saved = {m: adapter(tmp_path, m, seed=3)[0] for m in ("lora", "parade", "ia3_peft")}
    for name, method in (("good_lora", "lora"), ("good_parade", "parade")):
        engine.add_tenant(name, saved[method])
    for name, (method, breaks, words) in BROKEN.items():
        directory = tmp_path / name
        shutil.copytree(saved[method], directory)
        breaks(directory)
        with pytest.raises(TenantError) as info:
            engine.add_tenant(name, directory)
        assert str(info.value).startswith(f"{directory}: ") and words in str(info.value), (name, str(info.value))
        assert name not in engine.tenants
    names = ["good_lora", *BROKEN, "good_parade", None]
    requests = [Request(p, t) for p, t in zip(prompts(len(names), seed=9), names)]
    results = engine.generate(requests, max_new_tokens=NEW)
    assert [r.ok for r in results] == [True] + [False] * len(BROKEN) + [True, True]
    assert all("was refused" in r.error for r in results[1:-2])
    for req, res in zip(requests, results):
        if res.ok:                                   # the refused rows changed nothing for the others
            assert res.tokens == engine.generate([req], max_new_tokens=NEW)[0].tokens
            assert all(torch.isfinite(x).all() for x in engine.logits([req]))


def test_values_beyond_a_half_precision_engine_are_refused(tmp_path):
    engine = MultiTenantEngine(backbone().to(torch.float16))
    directory, _ = adapter(tmp_path, "ia3_peft", seed=4)
    edit_state(lambda t: t * 1e6)(directory)                   # finite in float32, inf in float16
    with pytest.raises(TenantError, match=r"beyond the serving dtype torch.float16"):
        engine.add_tenant("big", directory)
