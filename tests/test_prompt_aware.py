"""PARADE / PARA vector generators: identity at init, prompt-only pooling, KV-cache reuse, beams."""
import pytest
import torch

from papeft.methods import build_method
from papeft.methods.vector_generator import CapsulePooler, squash
from conftest import VOCAB, tiny_model

METHODS = {
    "parade": {"type": "parade", "r": 12, "num_capsules": 4, "pooler": "capsule"},
    "para": {"type": "para", "r": 12, "pooler": "last"},
}
ARCHS = ["llama", "gemma", "gpt2", "gpt_neox"]


def adapted(method: str, arch: str = "llama", randomise: bool = True):
    m = build_method(tiny_model(arch), METHODS[method])
    if randomise:  # move away from the identity so the vectors matter
        g = torch.Generator().manual_seed(1)
        for name, p in m.generators.named_parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("up.bias") else 0.0)
    return m.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method, arch):
    base = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    ref = base(ids).logits
    m = build_method(tiny_model(arch), METHODS[method])
    assert torch.equal(m(ids).logits, ref)
    randomised = adapted(method, arch)
    assert not torch.allclose(randomised(ids).logits, ref, atol=1e-4)  # the hooks do act


def greedy_recompute(m, ids, steps):
    """Greedy decoding without any cache: every step re-runs the whole sequence."""
    seq = ids
    prompt = torch.ones_like(ids)
    for _ in range(steps):
        pm = torch.cat([prompt, torch.zeros(ids.shape[0], seq.shape[1] - ids.shape[1], dtype=torch.long)], 1)
        logits = m(seq, attention_mask=torch.ones_like(seq), prompt_mask=pm, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_recompute(method, arch):
    m = adapted(method, arch)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    cached = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(cached, greedy_recompute(m, ids, 8))
    assert m._vectors is None and m._prompt_mask is None      # nothing outlives the request


@pytest.mark.parametrize("method", METHODS)
def test_vectors_read_the_prompt_only(method):
    m = adapted(method)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, 14), generator=g)
    pm = torch.zeros_like(ids)
    pm[:, :9] = 1                                               # 9 prompt tokens, 5 response tokens
    ref = m.prompt_vectors(ids, prompt_mask=pm)
    resp = ids.clone()
    resp[0, 11] = (resp[0, 11] + 1) % VOCAB                     # change a response token
    for a, b in zip(ref, m.prompt_vectors(resp, prompt_mask=pm)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    prompt = ids.clone()
    prompt[0, 8] = (prompt[0, 8] + 1) % VOCAB                   # change the last prompt token
    changed = m.prompt_vectors(prompt, prompt_mask=pm)
    assert any(not torch.allclose(a[k], b[k]) for a, b in zip(ref, changed) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_left_padding_barely_changes_vectors(method):
    m = adapted(method)
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], 1)
    a = m.prompt_vectors(ids)
    b = m.prompt_vectors(padded, attention_mask=mask, prompt_mask=mask)
    worst = max((a_l[k] - b_l[k]).abs().max().item() for a_l, b_l in zip(a, b) for k in a_l)
    assert worst < 1e-5
    # and generation from a left-padded batch matches generation of the row alone
    batch = torch.cat([padded, torch.randint(1, VOCAB, (1, 14), generator=torch.Generator().manual_seed(8))])
    bmask = torch.cat([mask, torch.ones(1, 14, dtype=torch.long)])
    out = m.generate(batch, attention_mask=bmask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    new = alone[0, ids.shape[1]:]                               # may stop early at EOS
    assert torch.equal(out[0, padded.shape[1]:padded.shape[1] + len(new)], new)


@pytest.mark.parametrize("method", METHODS)
def test_beam_search_rows_carry_their_own_vectors(method):
    m = adapted(method)
    g = torch.Generator().manual_seed(11)
    a, b = torch.randint(1, VOCAB, (1, 8), generator=g), torch.randint(1, VOCAB, (1, 8), generator=g)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    both = m.generate(torch.cat([a, b]), attention_mask=torch.ones(2, 8, dtype=torch.long), **kw)
    assert torch.equal(both[0], m.generate(a, attention_mask=torch.ones_like(a), **kw)[0])
    assert torch.equal(both[1], m.generate(b, attention_mask=torch.ones_like(b), **kw)[0])


def test_decode_step_without_prefill_is_refused():
    m = adapted("parade")
    ids = torch.randint(0, VOCAB, (1, 5))
    out = m.model(ids, use_cache=True)                           # prefill through the raw model ...
    m._clear()                                                   # ... whose vectors are then dropped
    with pytest.raises(RuntimeError, match="without prompt vectors"):
        m.model(ids[:, -1:], cache=out.past_key_values, use_cache=True)


def test_capsule_pooler_masks_and_squashes():
    torch.manual_seed(0)
    pool = CapsulePooler(12, 4)
    h = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = pool(h, mask)
    h2 = h.clone()
    h2[0, 3:] = 100.0                                            # masked tokens cannot matter
    assert torch.allclose(pool(h2, mask)[0], out[0])
    caps = out.view(2, 4, 3)
    assert (caps.norm(dim=-1) < 1).all()                         # squash keeps |c| < 1
    assert torch.allclose(squash(torch.zeros(1, 3)), torch.zeros(1, 3))
    assert out.shape == (2, 12)
