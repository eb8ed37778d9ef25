"""The SuperGLUE tasks COPA, BoolQ and RTE as `PromptTask`s (prompt templates from PARADE, Appendix C;
split protocol from Appendix B): both small, so the paper's dev and test sets are the halves of the
official validation file."""
from __future__ import annotations

from pathlib import Path

from .base import bad_row, no_rows, register_task, text_lines
from .prompt_task import OfficialTest, PromptTask

# the NLI labels (RTE and QNLI), the hub's ClassLabel order included
NLI_LABEL_WORDS = {"entailment": "entailment", "not_entailment": "not entailment", 0: "entailment",
                   1: "not entailment"}


def nli_template(first: str, second: str) -> str:
    """The paper's NLI template (RTE; QNLI reuses it) over the row fields `first` and `second`."""
    return (f"sentence 1: {{{first}}}\nsentence 2: {{{second}}}\n"
            "Are sentence 1 and sentence 2 have entailment relation or not?")


def read_copa_gold(path: Path) -> list[int]:
    """COPA's released test labels (`results/gold.test` of the authors' COPA-resources): one line
    `<item id> <1 if alternative 1> <1 if alternative 2>` per item, ids consecutive, in the order of
    copa-test.xml (= SuperGLUE test.jsonl); returns the SuperGLUE label (0: choice1, 1: choice2) of each."""
    labels: list[int] = []
    expected = "'<item id> 1 0' or '<item id> 0 1', one line per test item, consecutive ids"
    first_id = None
    for line_no, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        cells = line.split()
        if len(cells) != 3 or not all(c.isdigit() for c in cells) or sorted(cells[1:]) != ["0", "1"]:
            raise bad_row(f"{path}: line {line_no}", f"{line.strip()!r}", expected)
        first_id = int(cells[0]) if first_id is None else first_id
        if int(cells[0]) != first_id + len(labels):
            raise bad_row(f"{path}: line {line_no}", f"item id {cells[0]} after id {first_id + len(labels) - 1}",
                          expected)
        labels.append(0 if cells[1] == "1" else 1)
    if not labels:
        raise no_rows(path, expected)
    return labels


COPA = register_task(PromptTask(
    "copa", train_file="train.jsonl", val_file="val.jsonl",
    template="Premise:\n{premise}\nChoice 1: {choice1}\nChoice 2: {choice2}\nQuestion:\n{question}",
    value_maps={"question": {"cause": "What was the cause?", "effect": "What happened as a result?"}},
    label_words={0: "1", 1: "2"},
    hub_ids=[("super_glue", "copa"), ("aps/super_glue", "copa")],
    official_test=OfficialTest("test.jsonl", "COPA-resources/results/gold.test", read_copa_gold)))

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
