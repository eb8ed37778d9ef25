"""MultiTenantEngine: mixed batches equal single-tenant generation, gathered LoRA equals peft, refusals,
add/remove, and a prefill whose gathers do not grow with the batch."""
import shutil

import pytest
import torch

from papeft.serving import MultiTenantEngine, Request, TenantError
from papeft.serving.engine import CallHooks
from papeft.serving.banks import SlotStack, VectorBank
from papeft.backbone.architectures import role_sites
from papeft.methods import build_method
from papeft.methods.base import ADAPTER_WEIGHTS
from papeft.methods.serving_form import PromptVectors, StaticScales
from conftest import TINY, VOCAB, float64, tiny_model, within_float32_ulps

METHODS = {
    "parade": {"type": "parade", "r": 8, "num_capsules": 4, "pooler": "capsule"},
    "para": {"type": "para", "r": 8, "pooler": "last"},
    "pedro": {"type": "pedro", "r": 8},
    "lora": {"type": "lora", "r": 4},
    "ia3": {"type": "ia3", "r": 4},
    "ia3_peft": {"type": "ia3_peft"},
    "lopa": {"type": "lopa", "num_virtual_tokens": 3, "rank": 2, "hidden": 16},
}
TENANTS = {"parade": "parade", "parade_b": "parade", "para": "para", "pedro": "pedro", "pedro_b": "pedro",
           "lora": "lora", "lora_b": "lora", "ia3": "ia3", "ia3_peft": "ia3_peft", "lopa": "lopa"}  # name -> method
NEW = 6


@pytest.fixture(scope="module", autouse=True)
def in_float64():
    """Every model and adapter of this module in float64 (conftest.float64)."""
    with float64():
        yield


def backbone(arch: str = "llama"):
    """The tiny random model with a 10x sharper LM head: near-uniform outputs would hide small errors."""
    m = tiny_model(arch)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(10.0)
    return m


def randomise(m, seed: int):
    """Move every trainable weight away from its identity init so each tenant really differs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=g)
        if ".act." in name:                                   # PEDRO's rational: stay near GELU
            p.data = p.data + 0.05 * noise
        elif name.endswith("up.bias") or "ia3_l" in name:     # scales around 1
            p.data = 1.0 + 0.5 * noise
        else:
            p.data = 0.5 * noise
    return m.eval()


def adapter(tmp_path, method: str, seed: int, arch: str = "llama"):
    """(saved adapter directory, the single-tenant AdaptedModel it came from)."""
    m = randomise(build_method(backbone(arch), METHODS[method]), seed)
    d = tmp_path / f"{method}-{arch}-{seed}"
    m.save_adapter(d)
    return d, m


def prompts(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(L),), generator=g).tolist()
            for L in torch.randint(4, 12, (n,), generator=g)]


def single_tenant(m, ids, engine, beams):
    """(tokens, score) of one request through the tenant's own AdaptedModel.generate (score None for LoPA)."""
    x = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=NEW, num_beams=beams, do_sample=False,
              pad_token_id=engine.pad)
    if m.method == "lopa":                   # its generate returns plain sequences
        return engine.trim(m.generate(x, **kw)[0, x.shape[1]:].tolist()), None
    out = m.generate(x, **kw, return_dict_in_generate=True, output_scores=True)
    tokens = engine.trim(out.sequences[0, x.shape[1]:].tolist())
    if beams > 1:
        return tokens, out.sequences_scores[0].item()
    logp = torch.stack(out.scores, 1)[0].log_softmax(-1)                    # (n, V)
    return tokens, logp[torch.arange(len(tokens)), tokens].sum().item()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """An engine on tiny Llama with a tenant of every servable method, two of PARADE and LoRA (read-only)."""
    tmp_path = tmp_path_factory.mktemp("tenants")
    engine = MultiTenantEngine(backbone())
    refs = {}
    for k, (name, method) in enumerate(TENANTS.items()):
        d, refs[name] = adapter(tmp_path, method, seed=10 + k)
        engine.add_tenant(name, d)
    return engine, refs


@pytest.mark.parametrize("beams", [1, 3])
def test_mixed_batch_equals_alone_and_single_tenant_model(loaded, beams):
    engine, refs = loaded
    names = list(TENANTS) + [None]
    ps = prompts(len(names))
    requests = [Request(p, t) for p, t in zip(ps, names)]
    batch = engine.generate(requests, max_new_tokens=NEW, num_beams=beams, return_scores=True)
    for req, res in zip(requests, batch):
        assert res.ok and len(res.tokens) > 0
        alone = engine.generate([req], max_new_tokens=NEW, num_beams=beams, return_scores=True)[0]
        assert res.tokens == alone.tokens, req.tenant
        assert res.score == pytest.approx(alone.score, rel=1e-5, abs=1e-5), req.tenant
        if req.tenant is not None:
            tokens, score = single_tenant(refs[req.tenant], req.input_ids, engine, beams)
            assert res.tokens == tokens, req.tenant
            if score is not None:
                assert res.score == pytest.approx(score, rel=1e-5, abs=1e-5), req.tenant
    # one prompt for every tenant: each row really gets its own tenant's weights
    last = torch.stack([x[-1] for x in engine.logits([Request(ps[0], t) for t in names])])   # (7, V)
    gaps = (last[:, None] - last[None]).abs().amax(-1) + torch.eye(len(names))
    assert gaps.min() > 1e-3
    # the scaled modules' forwards were patched for the calls only: none is left behind
    assert not [n for n, m in engine.backbone.named_modules() if "forward" in m.__dict__]


def test_gpt2_fused_qkv_mixed_batch(tmp_path):
    engine = MultiTenantEngine(backbone("gpt2"))
    refs = {}
    for k, method in enumerate(["parade", "lora", "ia3"]):
        d, refs[method] = adapter(tmp_path, method, seed=30 + k, arch="gpt2")
        engine.add_tenant(method, d)
    requests = [Request(p, t) for p, t in zip(prompts(4, seed=3), ["parade", "lora", "ia3", None])]
    for req, res in zip(requests, engine.generate(requests, max_new_tokens=NEW)):
        assert res.tokens == engine.generate([req], max_new_tokens=NEW)[0].tokens
        if req.tenant:
            assert res.tokens == single_tenant(refs[req.tenant], req.input_ids, engine, 1)[0]


def test_gathered_lora_logits_equal_peft(tmp_path):
    gathered = MultiTenantEngine(backbone())
    peft = MultiTenantEngine(backbone(), lora_backend="peft")
    refs = {}
    for k, method in enumerate(["lora", "lora", "lora", "parade"]):
        d, refs[f"t{k}"] = adapter(tmp_path, method, seed=50 + k)
        gathered.add_tenant(f"t{k}", d)
        peft.add_tenant(f"t{k}", d)
    requests = [Request(p, t) for p, t in zip(prompts(6, seed=4), ["t0", "t1", None, "t2", "t0", "t3"])]
    ours, theirs = gathered.logits(requests), peft.logits(requests)
    for req, a, b in zip(requests, ours, theirs):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)          # one computation, two batchings
        x = torch.tensor([req.input_ids])
        if req.tenant:                                                 # peft scales B after the product
            within_float32_ulps(a, refs[req.tenant](x).logits[0])
        else:
            torch.testing.assert_close(a, gathered.backbone(x).logits[0], rtol=0, atol=1e-12)
    t0, t1 = gathered.logits([Request(requests[0].input_ids, "t0"), Request(requests[0].input_ids, "t1")])
    assert (t0 - t1).abs().max() > 1e-2                                  # the rows' own adapters act
    # the peft backend's mixed batch (PARADE row included) generates what the gathered one does
    for beams in (1, 3):
        a = gathered.generate(requests, max_new_tokens=NEW, num_beams=beams, return_scores=True)
        b = peft.generate(requests, max_new_tokens=NEW, num_beams=beams, return_scores=True)
        assert [r.tokens for r in a] == [r.tokens for r in b]
        assert [r.score for r in a] == pytest.approx([r.score for r in b], rel=1e-5, abs=1e-5)


def test_refusals_leave_the_rest_of_the_batch_alone(tmp_path):
    engine = MultiTenantEngine(backbone())
    good, _ = adapter(tmp_path, "parade", seed=1)
    lora, _ = adapter(tmp_path, "lora", seed=2)
    engine.add_tenant("good", good)
    engine.add_tenant("lora", lora)

    other = build_method(tiny_model("gemma"), METHODS["parade"])       # another backbone
    other.save_adapter(tmp_path / "other")
    with pytest.raises(TenantError, match="saved for backbone"):
        engine.add_tenant("other", tmp_path / "other")

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    data = (truncated / ADAPTER_WEIGHTS).read_bytes()
    (truncated / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(TenantError, match="corrupt"):
        engine.add_tenant("truncated", truncated)

    garbled = tmp_path / "garbled"
    shutil.copytree(good, garbled)
    (garbled / ADAPTER_WEIGHTS).write_bytes(b"\x07" * 16 + data[16:])   # header length + JSON broken
    with pytest.raises(TenantError, match="corrupt"):
        engine.add_tenant("garbled", garbled)

    nan = tmp_path / "nan"
    shutil.copytree(good, nan)
    (nan / ADAPTER_WEIGHTS).write_bytes(data[:-8] + b"\xff" * 8)       # float32 NaNs in the data
    with pytest.raises(TenantError, match="non-finite"):
        engine.add_tenant("nan", nan)

    with pytest.raises(TenantError, match="config"):
        engine.add_tenant("missing", tmp_path / "does-not-exist")

    ps = prompts(8, seed=5)
    names = ["good", "other", "truncated", "ghost", "lora", "garbled", None, "nan"]
    requests = [Request(p, t) for p, t in zip(ps, names)]
    requests.append(Request([VOCAB + 5, 3], "good"))                     # token id outside the vocabulary
    results = engine.generate(requests, max_new_tokens=NEW, num_beams=3)
    assert [r.ok for r in results] == [True, False, False, False, True, False, True, False, False]
    assert "saved for backbone" in results[1].error and "refused" in results[1].error
    assert "corrupt" in results[2].error and "corrupt" in results[5].error
    assert "unknown tenant 'ghost'" in results[3].error
    assert "non-finite" in results[7].error and "token ids" in results[8].error
    for req, res in zip(requests, results):
        if res.ok:
            assert res.tokens == engine.generate([req], max_new_tokens=NEW, num_beams=3)[0].tokens


@pytest.mark.parametrize("backend", ["gathered", "peft"])
def test_add_and_remove_tenants_while_others_are_loaded(tmp_path, backend):
    engine = MultiTenantEngine(backbone(), lora_backend=backend)
    dirs = {n: adapter(tmp_path, m, seed=70 + k)[0]
            for k, (n, m) in enumerate([("a", "parade"), ("b", "lora"), ("c", "para"), ("d", "lora")])}
    engine.add_tenant("a", dirs["a"])
    engine.add_tenant("b", dirs["b"])
    ps = prompts(4, seed=6)

    def ask(names):
        return engine.generate([Request(ps[k], n) for k, n in enumerate(names)], max_new_tokens=NEW)

    before = ask(["a", "b"])
    engine.add_tenant("c", dirs["c"])
    engine.add_tenant("d", dirs["d"])
    with pytest.raises(TenantError, match="already loaded"):
        engine.add_tenant("a", dirs["a"])
    after = ask(["a", "b", "c", "d"])
    assert [r.tokens for r in after[:2]] == [r.tokens for r in before]
    engine.remove_tenant("b")
    gone = ask(["a", "b", "c", "d"])
    assert not gone[1].ok and "unknown tenant 'b'" in gone[1].error
    assert [gone[k].tokens for k in (0, 2, 3)] == [after[k].tokens for k in (0, 2, 3)]
    engine.add_tenant("b", dirs["b"])                                   # back, into a freed slot
    assert [r.tokens for r in ask(["a", "b", "c", "d"])] == [r.tokens for r in after]
    with pytest.raises(TenantError, match="not loaded"):
        engine.remove_tenant("zzz")


def test_prefill_gathers_once_per_bank_not_per_row_and_decode_runs_no_generator(loaded, monkeypatch):
    engine, _ = loaded
    calls = {"vectors": 0, "gather": 0}
    vectors, gather = VectorBank.vectors, SlotStack.gather

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(VectorBank, "vectors", count("vectors", vectors))
    monkeypatch.setattr(SlotStack, "gather", count("gather", gather))
    names = ["parade", "parade_b", "para", "pedro", "pedro_b", "lora", "lora_b", "ia3", None]
    seen = []
    for copies in (1, 4):                                               # 9 prompts, then 36
        calls.update(vectors=0, gather=0)
        reqs = [Request(p, t) for p, t in zip(prompts(9 * copies, seed=7), names * copies)]
        assert all(r.ok for r in engine.generate(reqs, max_new_tokens=NEW, num_beams=3))
        seen.append(dict(calls))
    assert seen[0] == seen[1]                                           # independent of the batch size
    layers = TINY["llama"]["num_hidden_layers"]
    assert seen[0]["vectors"] == 3 * layers                             # 3 vector banks, at prefill only


@pytest.mark.parametrize("beams", [1, 3])
def test_prefill_vectors_of_every_row_equal_its_tenants_own(loaded, beams, monkeypatch):
    """The gathered generators give each prompt (shared by its beams) its tenant's vectors; other rows get 1."""
    engine, refs = loaded
    kept = []
    exit_ = CallHooks.__exit__
    monkeypatch.setattr(CallHooks, "__exit__", lambda self, *exc: (kept.append(self.scales), exit_(self, *exc))[1])
    names = ["parade", "lora", "parade_b", "pedro", None, "para", "pedro_b", "ia3"]
    requests = [Request(p, t) for p, t in zip(prompts(len(names), seed=11), names)]
    assert all(r.ok for r in engine.generate(requests, max_new_tokens=2, num_beams=beams))
    scales = kept[0]
    sites = {s.role: s for s in role_sites(engine.backbone, ["q", "k", "v", "up"], scaling=True)}
    for b, req in enumerate(requests):
        x = torch.tensor([req.input_ids])
        for i in range(TINY["llama"]["num_hidden_layers"]):
            want = expected_scales(engine, refs, req.tenant, x, i)            # role -> (width,)
            for role in ("q", "k", "v", "up"):
                s = scales.get((i, sites[role].path, "out"))                  # (P, 1, width) or absent
                if s is None:
                    continue
                if role in want:
                    torch.testing.assert_close(s[b, 0], want[role], rtol=1e-5, atol=1e-6)
                else:
                    assert torch.equal(s[b, 0], torch.ones_like(s[b, 0])), (req.tenant, role)


def expected_scales(engine, refs, tenant, x, i) -> dict:
    """Layer i's scale per role for a request, from the tenant's own single-tenant model."""
    form = engine.tenants[tenant].served_as if tenant else None
    if form is PromptVectors:
        return {role: v[0] for role, v in refs[tenant].prompt_vectors(x)[i].items()}
    if form is StaticScales:
        return {s.role: 1 + refs[tenant].vectors[i][s.role]() for s in refs[tenant].sites}
    return {}


def test_soft_prompt_rows_mix_with_adapter_rows(loaded):
    engine, _ = loaded
    d = engine.backbone.config.hidden_size
    soft = torch.randn(3, d, generator=torch.Generator().manual_seed(8))
    ps = prompts(3, seed=9)
    requests = [Request(ps[0], soft_prompt=soft), Request(ps[1], "parade"), Request(ps[2], "lora"),
                Request(ps[0], soft_prompt=torch.ones(2, d + 1))]
    results = engine.generate(requests, max_new_tokens=NEW)
    assert [r.ok for r in results] == [True, True, True, False] and "soft_prompt" in results[3].error
    embeds = torch.cat([soft, engine.backbone.get_input_embeddings()(torch.tensor(ps[0]))])[None]
    ref = engine.backbone.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                   max_new_tokens=NEW, do_sample=False, pad_token_id=engine.pad)
    assert results[0].tokens == engine.trim(ref[0].tolist())
    for req, res in zip(requests[1:3], results[1:3]):                   # unchanged by the embeds path
        assert res.tokens == engine.generate([req], max_new_tokens=NEW)[0].tokens
