"""Prompt-response encoding: loss on the response only, prompt mask, padding sides, templates."""
import pytest
import torch

from papeft.tasks.prompting import KEEP_HEAD, Encoded, PromptFormatter, collate_prompts, collate_train


class CharTokenizer:
    """A stand-in tokenizer: one id per character, no chat template."""
    bos_token, eos_token, bos_token_id, eos_token_id, pad_token_id = "^", "$", 1, 2, 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


def test_train_collation_masks_prompt_and_padding():
    batch = [Encoded([5, 6, 7], [8, 2]), Encoded([5, 6], [9, 9, 2])]
    out = collate_train(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 2], [5, 6, 9, 9, 2]]
    assert out["labels"].tolist() == [[-100, -100, -100, 8, 2], [-100, -100, 9, 9, 2]]
    assert out["prompt_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    short = collate_train([Encoded([5], [2]), Encoded([5, 6, 7], [8, 2])], pad_id=0)
    assert short["attention_mask"][0].tolist() == [1, 1, 0, 0, 0]
    assert short["labels"][0].tolist() == [-100, 2, -100, -100, -100]


def test_prompt_collation_pads_left():
    out = collate_prompts([Encoded([5, 6], []), Encoded([7, 8, 9], [])], pad_id=0)
    assert out["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert out["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


def test_plain_and_llama2_templates():
    tok = CharTokenizer()
    plain = PromptFormatter(tok, "auto")          # no chat template -> plain
    assert plain.prompt_text("Q") == "Q\n"
    enc = plain.encode("Q", "yes")
    assert enc.prompt[0] == tok.bos_token_id and enc.response[-1] == tok.eos_token_id
    l2 = PromptFormatter(tok, "llama2").prompt_text("Is it?")
    assert l2.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.\n<</SYS>>\n\n")
    assert l2.endswith("Is it? [/INST] ")
    with pytest.raises(ValueError, match="chat_template"):
        PromptFormatter(tok, "chatml")


def test_overlong_prompt_keeps_head_and_tail():
    tok = CharTokenizer()
    fmt = PromptFormatter(tok, "none", max_length=40)
    text = "H" * 30 + "M" * 100 + "TAIL?"
    enc = fmt.encode(text, "ok")
    assert len(enc.prompt) + len(enc.response) == 40
    full = fmt.encode_prompt(text)
    assert enc.prompt[:KEEP_HEAD] == full[:KEEP_HEAD] and enc.prompt[-6:] == full[-6:]


def test_smollm2_chat_template_is_its_own():
    from papeft.backbone.loading import load_tokenizer
    from conftest import REPO
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs/backbone/smollm2_135m.yaml"), resolve=True)
    tok = load_tokenizer(cfg)
    enc = PromptFormatter(tok, "auto").encode("Premise: x", "1")
    text = tok.decode(enc.prompt)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.response) == "1<|im_end|>"
    assert torch.tensor(enc.prompt).dtype == torch.long
