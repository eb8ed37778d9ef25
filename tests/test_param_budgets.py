"""Tunable parameters on the LLaMA-2 7B shape (meta device, no weights) against the PARADE paper's
Table 1 parameter column, within 0.1M, counting weights only (b_up and other biases excluded)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from papeft.backbone.loading import architecture_config, backbone_config
from papeft.methods import build_method
from papeft.paths import group_file

LLAMA2_7B = architecture_config(backbone_config("llama2_7b"))      # the shape configs/backbone/llama2_7b.yaml ships
PAPER_M = {"lora": 10.0, "ia3": 9.8, "bitfit": 10.9, "parade": 8.9, "parade_3": 9.8, "parade_4": 9.4,
           "parallel": 9.4, "houlsby": 9.4, "adapterdrop": 9.2, "ptuning_v2": 9.4}


@pytest.mark.parametrize("name,paper", sorted(PAPER_M.items()))
def test_budget_matches_table1(name, paper):
    cfg = group_file("method", name)
    with torch.device("meta"):
        counts = build_method(AutoModelForCausalLM.from_config(LLAMA2_7B), cfg).param_counts()
    assert abs(counts["params_trainable_no_bias"] / 1e6 - paper) <= 0.1, counts
