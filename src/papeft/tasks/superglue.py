"""The SuperGLUE tasks COPA, BoolQ and RTE as `PromptTask`s (prompt templates from PARADE, Appendix C;
split protocol from Appendix B): both small, so the paper's dev and test sets are the halves of the
official validation file."""
from __future__ import annotations

from .base import register_task
from .prompt_task import PromptTask

# the NLI labels (RTE and QNLI), the hub's ClassLabel order included
NLI_LABEL_WORDS = {"entailment": "entailment", "not_entailment": "not entailment", 0: "entailment",
                   1: "not entailment"}


def nli_template(first: str, second: str) -> str:
    """The paper's NLI template (RTE; QNLI reuses it) over the row fields `first` and `second`."""
    return (f"sentence 1: {{{first}}}\nsentence 2: {{{second}}}\n"
            "Are sentence 1 and sentence 2 have entailment relation or not?")


COPA = register_task(PromptTask(
    "copa", train_file="train.jsonl", val_file="val.jsonl",
    template="Premise:\n{premise}\nChoice 1: {choice1}\nChoice 2: {choice2}\nQuestion:\n{question}",
    value_maps={"question": {"cause": "What was the cause?", "effect": "What happened as a result?"}},
    label_words={0: "1", 1: "2"},
    hub_ids=[("super_glue", "copa"), ("aps/super_glue", "copa")]))

BOOLQ = register_task(PromptTask(
    "boolq", train_file="train.jsonl", val_file="val.jsonl",
    template="Reference document:\n{passage}\nQuestion:\n{question}",
    label_words={"true": "yes", "false": "no", "1": "yes", "0": "no"},  # local: JSON bools; hub ClassLabel: 0, 1
    label_fields=("label", "answer"),  # google/boolq calls it "answer"
    hub_ids=[("super_glue", "boolq"), ("aps/super_glue", "boolq"), ("google/boolq", None)]))

RTE = register_task(PromptTask(
    "rte", train_file="train.jsonl", val_file="val.jsonl",
    template=nli_template("premise", "hypothesis"), label_words=NLI_LABEL_WORDS,
    hub_ids=[("super_glue", "rte"), ("aps/super_glue", "rte")]))
