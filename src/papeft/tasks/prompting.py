"""Prompt-response formatting, tokenisation and batching.

Each example becomes  [chat prompt tokens][response tokens][end token]. The
loss covers the response and its end token only (labels are -100 elsewhere);
`prompt_mask` marks the prompt tokens, the only ones a vector generator may read.

Chat template (METHODS.md 4): `auto` uses the tokenizer's own template when it
has one; `llama2` is LLaMA-2's `[INST] <<SYS>> ... <</SYS>> ... [/INST]`;
`none` (or `auto` without a template) is the bare prompt followed by a newline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LLAMA2_SYSTEM = "You are a helpful, respectful and honest assistant."
KEEP_HEAD = 16   # tokens kept at the start of an over-long prompt (template header)


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]
    response: list[int]


class PromptFormatter:
    def __init__(self, tokenizer, chat_template: str = "auto", system_prompt: str | None = None,
                 max_length: int = 2048):
        if chat_template not in ("auto", "llama2", "none"):
            raise ValueError(f"backbone.chat_template='{chat_template}'; expected auto | llama2 | none")
        if chat_template == "auto" and not getattr(tokenizer, "chat_template", None):
            chat_template = "none"
        self.tok, self.mode, self.system, self.max_length = tokenizer, chat_template, system_prompt, max_length

    def prompt_text(self, prompt: str | list[dict]) -> str:
        """The text before the response. `prompt` is one user turn, or a chat as a list of
        {"role": "user" | "assistant", "content"} messages ending with a user turn."""
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not msgs or msgs[-1]["role"] != "user":
            raise ValueError("a prompt chat must end with a user message")
        if self.mode == "llama2":
            system = self.system or LLAMA2_SYSTEM
            text = f"<<SYS>>\n{system}\n<</SYS>>\n\n"
            turns = []
            for i in range(0, len(msgs), 2):
                answer = f" {msgs[i + 1]['content'].strip()} {self.tok.eos_token}" if i + 1 < len(msgs) else " "
                turns.append(f"[INST] {text}{msgs[i]['content'].strip()} [/INST]{answer}")
                text = ""
            return f"{self.tok.bos_token}".join(turns)
        if self.mode == "auto":
            system = [{"role": "system", "content": self.system}] if self.system else []
            return self.tok.apply_chat_template(system + msgs, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in msgs) + "\n"

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        ids = self.tok(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]
        bos = self.tok.bos_token_id
        if self.mode != "auto" and bos is not None and self.tok.bos_token != self.tok.eos_token:
            ids = [bos] + ids          # llama2 / plain models start with <s>; chat templates carry their own
        return ids

    def encode(self, prompt: str | list[dict], response: str = "") -> Encoded:
        """Token ids of the prompt and of the response + end token, cut to `max_length` in total.

        Over-long prompts lose their middle: the first KEEP_HEAD tokens (template
        header) and the tail (the question) are kept; our reading, the paper's
        2048 tokens rarely bind.
        """
        p = self.encode_prompt(prompt)
        r = self.tok(response, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] if response else []
        r = r[: self.max_length // 2]
        room = self.max_length - len(r)
        if len(p) > room:
            p = p[:KEEP_HEAD] + p[len(p) - (room - KEEP_HEAD):]
        return Encoded(p, r)


def collate_train(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded teacher-forcing batch: input_ids, attention_mask, prompt_mask, labels (B, T)."""
    T = max(len(e.prompt) + len(e.response) for e in batch)
    out = {k: torch.zeros(len(batch), T, dtype=torch.long) for k in ("input_ids", "attention_mask", "prompt_mask")}
    out["input_ids"].fill_(pad_id)
    out["labels"] = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        n_p, n = len(e.prompt), len(e.prompt) + len(e.response)
        out["input_ids"][i, :n] = torch.tensor(e.prompt + e.response)
        out["attention_mask"][i, :n] = 1
        out["prompt_mask"][i, :n_p] = 1
        out["labels"][i, n_p:n] = torch.tensor(e.response)
    return out


def collate_prompts(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: input_ids, attention_mask (B, T)."""
    T = max(len(e.prompt) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, T - len(e.prompt):] = torch.tensor(e.prompt)
        mask[i, T - len(e.prompt):] = 1
    return {"input_ids": ids, "attention_mask": mask}
