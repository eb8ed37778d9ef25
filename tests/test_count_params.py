"""scripts/count_params.py and the backbone shapes it counts on: a real command line, every backbone
from the shape its YAML ships (no hub), and the README's method table reproduced from it."""
import csv
import io
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from papeft.backbone.loading import architecture_config, backbone_config, dequantised_checkpoint
from papeft.paths import group_file
from conftest import REPO, load_script

count_params = load_script("count_params")

# Total weights as the model cards / papers report them (LLaMA-2, Gemma, GPT-2, Pythia; SmolLM2 from its GGUF):
# an independent check of every `shape:` block.
PUBLISHED_TOTALS = {"llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "gemma_2b": 2_506_172_416,
                    "gpt2_large": 774_030_080, "pythia_1_4b": 1_414_647_808, "smollm2_135m": 134_515_008}


def readme_method_rows() -> dict[str, tuple[str, str]]:
    """method -> (LLaMA-2 7B cell, SmolLM2-135M cell) of the README's Methods table."""
    text = (REPO / "README.md").read_text().split("## Methods", 1)[1].split("\n\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[m.group(1)] = (cells[2], cells[4])
    return rows


def test_help_is_help_not_a_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        count_params.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--backbone" in out and "--format" in out and "parade" in out and "gemma_2b" in out


@pytest.mark.parametrize("argv,named", [(["lora", "no_such_method"], "no_such_method"),
                                        (["lora", "-b", "no_such_backbone"], "no_such_backbone")])
def test_unknown_names_are_usage_errors(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        count_params.main(argv)
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_csv_for_a_tiny_backbone(tmp_path):
    out = tmp_path / "params.csv"
    count_params.main(["lora", "ia3_peft", "-b", "tiny_llama", "--format", "csv", "--out", str(out)])
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    assert set(rows) == {"lora", "ia3_peft"} and rows["lora"]["backbone"] == "tiny_llama"
    cfg = backbone_config("tiny_llama")["config"]           # d=64, d_ffn=128, 4 heads, 2 KV heads, 2 layers
    d, f, kv = cfg["hidden_size"], cfg["intermediate_size"], 2 * cfg["hidden_size"] // cfg["num_attention_heads"]
    lora = cfg["num_hidden_layers"] * 4 * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + f) + (f + d))  # r=4, 7 linears
    assert int(rows["lora"]["params_trainable_no_bias"]) == int(rows["lora"]["params_trainable"]) == lora
    assert int(rows["ia3_peft"]["params_trainable"]) == cfg["num_hidden_layers"] * (kv + kv + f)    # k, v, down in
    with torch.device("meta"):
        expected_total = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.for_model("llama", **cfg, vocab_size=49152)).parameters())   # SmolLM2's tokenizer
    assert int(rows["lora"]["params_backbone"]) == expected_total


def test_method_that_does_not_fit_gets_a_reason():
    row = count_params.count_row(backbone_config("tiny_gpt2"), {"name": "ia3_gate", "type": "ia3", "targets": ["gate"]})
    assert row["params_trainable"] is None and "gate" in row["note"]
    md = count_params.markdown([row])
    assert "| ia3_gate | n/a |" in md and "n/a: ia3_gate on tiny_gpt2" in md


@pytest.mark.parametrize("name,total", sorted(PUBLISHED_TOTALS.items()))
def test_shipped_shapes_give_the_published_sizes(name, total):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture_config(backbone_config(name)))
    assert sum(p.numel() for p in model.parameters()) == total


def test_smollm2_shape_is_the_ggufs():
    cfg = backbone_config("smollm2_135m")
    try:
        gguf = AutoConfig.from_pretrained(dequantised_checkpoint(cfg)).to_dict()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    ours = architecture_config(cfg).to_dict()
    for key in [*cfg["shape"], "rope_parameters", "hidden_act", "head_dim"]:
        if key in ("rope_theta", "rms_norm_eps"):
            continue                                       # folded into rope_parameters / float32 in the GGUF
        assert ours[key] == gguf[key], key
    assert ours["rms_norm_eps"] == pytest.approx(gguf["rms_norm_eps"], rel=1e-6)


def test_a_backbone_without_shape_is_refused_by_name():
    cfg = {k: v for k, v in backbone_config("gemma_2b").items() if k != "shape"}
    with pytest.raises(ValueError, match=r"gemma_2b.*shape:"):
        architecture_config(cfg)


@pytest.mark.parametrize("method,cells", sorted(readme_method_rows().items()))
def test_readme_method_table_is_what_the_script_counts(method, cells):
    cfg = group_file("method", method)
    got = [count_params.count_row(backbone_config(b), cfg) for b in ("llama2_7b", "smollm2_135m")]
    assert [f"{r['params_trainable_no_bias']:,} / {r['params_trainable']:,}" for r in got] == list(cells)


def test_readme_table_lists_every_method():
    assert set(readme_method_rows()) == {p.stem for p in (REPO / "configs/method").glob("*.yaml")}


def test_random_weights_of_a_shipped_shape_are_the_same_in_every_process():
    """The serving benchmark's `--random-weights`: a server and the reference engine draw the same weights."""
    from papeft.backbone.loading import load_random_weights
    cfg = {"name": "small", "dtype": "float32", "shape": {"model_type": "llama", "vocab_size": 97, "hidden_size": 16,
                                                          "intermediate_size": 32, "num_hidden_layers": 2,
                                                          "num_attention_heads": 2, "num_key_value_heads": 1}}
    (a, tok), (b, _) = load_random_weights(cfg), load_random_weights(cfg)
    assert a.config.num_hidden_layers == 2 and a.config.vocab_size == 97 and len(tok) > 97
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, load_random_weights(cfg, seed=1)[0].lm_head.weight)
