"""AdaLoRA, prompt tuning / P-tuning / P-tuning v2 and LoPA: pruning, alignment, generation, budgets.

Importing the method modules registers them (the package __init__ may not list them yet).
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from papeft.methods.base import build_method
from papeft.methods import adalora, lopa, prompt_learning  # noqa: F401  (registration)
from papeft.paths import group_file
from conftest import VOCAB, tiny_model, within_float32_ulps

ARCHS = ["llama", "gemma", "gpt2", "gpt_neox"]
PROMPT_YAMLS = ["prompt_tuning", "ptuning", "ptuning_v2"]
LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32)


def yaml_cfg(name, **override):
    cfg = group_file("method", name)
    return {**cfg, **override}


def build(cfg, arch="llama"):
    torch.manual_seed(0)
    return build_method(tiny_model(arch), cfg).eval()


def ids_batch(B=2, T=9, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def scramble(model, scale=2.0, seed=1):
    """Move the trainable weights away from their init, so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))


def greedy_by_forward(model, prompt, steps, prompt_len):
    """Greedy decoding by re-running the whole growing sequence through forward (no cache)."""
    seq = prompt
    for _ in range(steps):
        pm = torch.zeros_like(seq)
        pm[:, :prompt_len] = 1
        with torch.no_grad():
            logits = model(seq, attention_mask=torch.ones_like(seq), prompt_mask=pm, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def on_meta(cfg, hf_config=LLAMA2_7B):
    with torch.device("meta"):
        return build_method(AutoModelForCausalLM.from_config(hf_config), cfg).param_counts()


# ---- AdaLoRA ---------------------------------------------------------------------------

def test_adalora_prunes_ranks_after_tinit():
    m = build(yaml_cfg("adalora"))
    m.train()
    m.on_train_begin(20)                          # tinit 2, tfinal 6: pruning from step 3, fixed after 14
    pc = m.peft_config
    assert (pc.total_step, pc.tinit, pc.tfinal, pc.deltaT) == (20, 2, 6, 1)
    ids = ids_batch(4, 10)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 16):
        logits = m(ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:]).backward()
        opt.step()
        m.on_step_end(step)
        opt.zero_grad()
        if step == 2:
            assert m.rank_pattern() == {}          # still in the warm-up at the full budget
    pattern = m.rank_pattern()
    kept = sum(sum(v) for v in pattern.values())
    total = sum(len(v) for v in pattern.values())
    assert total == 14 * 8                         # 2 layers x 7 linears x init rank 8
    assert kept == 14 * 4                          # target budget: mean rank 4
    E = [p for n, p in m.named_parameters() if ".lora_E." in n]
    assert sum(int((e == 0).sum()) for e in E) == total - kept


def test_adalora_resume_state_continues_identically():
    ids = ids_batch(4, 10)

    def step(model, opt, i):
        logits = model(ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:]).backward()
        opt.step()
        model.on_step_end(i)
        opt.zero_grad()

    runs = []
    for _ in range(2):
        m = build(yaml_cfg("adalora")).train()
        m.on_train_begin(20)
        runs.append((m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)))
    (a, opt_a), (b, opt_b) = runs
    for i in range(1, 7):
        step(a, opt_a, i)
    b.load_trainable_state_dict(a.trainable_state_dict())
    b.load_resume_state(a.resume_state())
    assert b.rank_pattern() == a.rank_pattern() != {}
    for i in range(7, 10):
        step(a, opt_a, i)
        step(b, opt_b, i)
    assert b.rank_pattern() == a.rank_pattern()
    for (n, p), q in zip(a.trainable_state_dict().items(), b.trainable_state_dict().values()):
        assert torch.equal(p, q), n


def test_adalora_orthogonality_regulariser_reaches_the_gradient():
    m = build(yaml_cfg("adalora"))
    m.train()
    m.step_regularizer().backward()
    grads = [p.grad for n, p in m.named_parameters() if ".lora_A." in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert build(yaml_cfg("adalora", orth_reg_weight=0.0)).step_regularizer() is None
    ids = ids_batch()
    with torch.no_grad():                         # the forward is peft's, untouched
        assert torch.equal(m(ids).logits, m.model(input_ids=ids).logits)


def _adalora_step_grads(micro: int, weight: float) -> dict:
    from papeft.tasks.prompting import Encoded
    from papeft.train.trainer import Trainer, TrainerConfig
    m = build(yaml_cfg("adalora", orth_reg_weight=weight)).double().train()    # float64: sums in any order agree
    scramble(m, scale=0.5)
    g = torch.Generator().manual_seed(3)
    examples = [Encoded(torch.randint(3, 90, (6,), generator=g).tolist(),
                        torch.randint(3, 90, (1 + k % 3,), generator=g).tolist() + [2]) for k in range(4)]
    cfg = TrainerConfig(progress=False, device="cpu", batch_size=4, micro_batch_size=micro)
    Trainer(m, cfg, pad_id=0, eos_id=2, seed=0)._accumulate(examples, micro, regularize=True)
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def test_adalora_regulariser_enters_once_per_optimizer_step_whatever_the_micro_batch():
    whole, per_example = _adalora_step_grads(4, 0.5), _adalora_step_grads(1, 0.5)
    plain = _adalora_step_grads(4, 0.0)
    m = build(yaml_cfg("adalora")).double().train()
    scramble(m, scale=0.5)
    (0.5 * m.orthogonality_loss()).backward()
    reg = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    for name in whole:
        within_float32_ulps(per_example[name], whole[name])
        within_float32_ulps(whole[name], plain[name] + (reg[name] if reg[name] is not None else 0))
    assert any(reg[n] is not None and reg[n].abs().max() > 1e-3 for n in whole)   # the term is there


def test_adalora_counts_and_bad_config():
    counts = on_meta(yaml_cfg("adalora"))
    # rank 8 everywhere: 32 x [4 x 8 x (4096 + 4096 + 1) + 3 x 8 x (4096 + 11008 + 1)]
    assert counts["params_trainable_no_bias"] == 32 * (4 * 8 * 8193 + 3 * 8 * 15105) == 19_990_272
    with pytest.raises(ValueError, match="target_r"):
        build(yaml_cfg("adalora", target_r=9))
    with pytest.raises(ValueError, match="tinit_fraction"):
        build(yaml_cfg("adalora", tinit_fraction=0.8, tfinal_fraction=0.3))
    with pytest.raises(RuntimeError, match="on_train_begin"):
        build(yaml_cfg("adalora")).on_step_end(1)


# ---- prompt tuning, P-tuning, P-tuning v2 ---------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", PROMPT_YAMLS)
def test_prompt_methods_align_logits_and_generate(name, arch):
    m = build(yaml_cfg(name, num_virtual_tokens=4), arch)
    scramble(m)
    ids = ids_batch(2, 9)
    with torch.no_grad():
        full = m(ids, attention_mask=torch.ones_like(ids)).logits
        head = m(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long)).logits
    assert full.shape == (2, 9, VOCAB)
    assert torch.allclose(full[:, :5], head, atol=1e-5)       # causal and aligned: position t sees ids[:t+1]
    assert not torch.allclose(full, tiny_model(arch)(ids).logits, atol=1e-3)   # the prompt acts
    prompt = ids[:, :6]
    for beams in (1, 3):
        out = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                         num_beams=beams, pad_token_id=0, eos_token_id=None)
        assert out.shape == (2, 10) and torch.equal(out[:, :6], prompt)
        if beams == 1:
            assert torch.equal(out, greedy_by_forward(m, prompt, 4, 6))


@pytest.mark.parametrize("name", PROMPT_YAMLS + ["lopa"])
def test_left_padding_does_not_change_generation(name):
    """The trainer left-pads prompts: a padded row generates what it generates alone."""
    m = build(yaml_cfg(name))
    scramble(m, 5.0)
    long, short = ids_batch(1, 8, seed=2), ids_batch(1, 5, seed=3)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 8, dtype=torch.long), (batch[1:] != 0).long()])
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0, eos_token_id=None)
    together = m.generate(batch, attention_mask=mask, **kw)
    alone = m.generate(short, attention_mask=torch.ones_like(short), **kw)
    assert torch.equal(together[1, 8:], alone[0, 5:])


def test_prompt_learning_budgets_and_bad_config():
    def counts(name):
        c = on_meta(yaml_cfg(name))
        return c["params_trainable_no_bias"], c["params_trainable"]
    assert counts("prompt_tuning") == (64 * 4096,) * 2
    assert counts("ptuning") == (64 * 36 + 36 * 4096, 64 * 36 + 36 * 4096 + 4096)
    assert counts("ptuning_v2") == (64 * 36 + 36 * 32 * 2 * 4096, 64 * 36 + 36 * 32 * 2 * 4096 + 32 * 2 * 4096)
    assert counts("ptuning_v2")[0] == 9_439_488                                  # the paper's "9.4M"
    assert on_meta(yaml_cfg("ptuning_v2", projection_dim=None))["params_trainable"] == 32 * 2 * 64 * 4096
    with pytest.raises(ValueError, match="method.kind"):
        build(yaml_cfg("ptuning", kind="ptuning"))
    with pytest.raises(ValueError, match="method.projection_dim"):
        build(yaml_cfg("prompt_tuning", projection_dim=36))
    with pytest.raises(ValueError, match="method.num_virtual_tokens"):
        build(yaml_cfg("ptuning", num_virtual_tokens=0))


def test_prefix_respects_grouped_query_attention():
    """GQA backbone (SmolLM2-like: 9 heads, 3 KV heads): the prefix has the K/V width, not d."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=36, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3)
    counts = on_meta(yaml_cfg("ptuning_v2", projection_dim=None), cfg)
    assert counts["params_trainable"] == 64 * 2 * 2 * 3 * 4


# ---- LoPA ------------------------------------------------------------------------------

def lopa_inputs():
    ids = ids_batch(3, 10)
    pm = torch.zeros_like(ids)
    pm[:, :6] = 1
    return ids, torch.ones_like(ids), pm


def test_lopa_soft_prompt_is_per_instance_and_ignores_the_response():
    m = build(yaml_cfg("lopa"))
    scramble(m, scale=20.0)
    ids, am, pm = lopa_inputs()
    with torch.no_grad():
        z = m.soft_prompt(ids, am, pm)
        assert z.shape == (3, 10, 48)
        assert not torch.allclose(z[0], z[1])                    # instance-specific
        other = ids.clone()
        other[:, 6:] = (other[:, 6:] + 1) % VOCAB                # change only the response
        assert torch.equal(m.soft_prompt(other, am, pm), z)
        padded = torch.cat([ids, torch.zeros(3, 2, dtype=torch.long)], 1)   # padding is not prompt
        assert torch.allclose(m.soft_prompt(padded, torch.cat([am, torch.zeros(3, 2, dtype=torch.long)], 1),
                                            torch.cat([pm, torch.ones(3, 2, dtype=torch.long)], 1)), z)


def test_lopa_logits_aligned_and_generation_matches_forward():
    m = build(yaml_cfg("lopa"))
    scramble(m, scale=20.0)
    ids, am, pm = lopa_inputs()
    with torch.no_grad():
        full = m(ids, attention_mask=am, prompt_mask=pm).logits
        head = m(ids[:, :7], attention_mask=am[:, :7], prompt_mask=pm[:, :7]).logits
    assert full.shape == (3, 10, VOCAB)
    assert torch.allclose(full[:, :7], head, atol=1e-5)
    with torch.no_grad():                                         # by hand: [Z; E(x)], drop the m soft positions
        z = m.soft_prompt(ids, am, pm)
        by_hand = m.backbone(inputs_embeds=torch.cat([z, m.backbone.get_input_embeddings()(ids)], 1)).logits
    assert torch.allclose(full, by_hand[:, 10:], atol=1e-5)
    prompt = ids[:, :6]
    out = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                     num_beams=1, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, greedy_by_forward(m, prompt, 5, 6))
    beam = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                      num_beams=3, pad_token_id=0, eos_token_id=None)
    assert beam.shape == (3, 11) and torch.equal(beam[:, :6], prompt)


def test_lopa_budget_on_llama2_7b_and_bad_config():
    counts = on_meta(yaml_cfg("lopa"))
    m, r, d, h = 10, 4, 4096, 256
    weights = m * d + (d * h + h * m * r) + (d * h + h * d * r)      # Z_S + H_u + H_v
    assert counts["params_trainable_no_bias"] == weights == 6_342_656
    assert counts["params_trainable"] == weights + (h + m * r) + (h + d * r)
    with pytest.raises(ValueError, match="method.encoder"):
        build(yaml_cfg("lopa", encoder="bert"))
    with pytest.raises(ValueError, match="method.rank"):
        build(yaml_cfg("lopa", rank=0))


class WordTokenizer:
    """Stands in for a backbone tokenizer: id i decodes to a word."""
    WORDS = ["the", "cat", "sat", "on", "mat", "stock", "market", "fell", "sharply", "today"]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.WORDS[i % len(self.WORDS)] for i in ids)


def test_minilm_encoder_embeds_text():
    enc = lopa.shared_minilm()
    x = enc(["the cat sat on the mat", "a cat was sitting on a mat", "the stock market fell sharply"])
    assert x.shape == (3, 384)
    assert torch.allclose(x.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2                    # a sentence encoder, not noise
    m = build(yaml_cfg("lopa", encoder="minilm"))
    ids, am, pm = lopa_inputs()
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        m.soft_prompt(ids, am, pm)
    m.set_tokenizer(WordTokenizer())
    with torch.no_grad():
        assert m.soft_prompt(ids, am, pm).shape == (3, 10, 48)
        assert torch.equal(m.encode(ids, pm.bool()), enc([WordTokenizer().decode(r[:6].tolist()) for r in ids]))
