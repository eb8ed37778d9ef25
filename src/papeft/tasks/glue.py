"""The GLUE tasks SST-2 and QNLI (PARADE, Appendix C templates) as `PromptTask`s.

Both are large datasets, so under the paper protocol 1,000 rows of the official train file
(split_seed shuffle) become the dev set, the rest is train, and the official dev.tsv is the test set.
QNLI's train.tsv is not in shared/data (over 4 MiB): use task.split_protocol=dev_only or task.source=hub.
"""
from __future__ import annotations

from .base import register_task
from .prompt_task import PromptTask
from .superglue import NLI_LABEL_WORDS, nli_template

SST2_DEV_FROM_TRAIN = 1000
QNLI_DEV_FROM_TRAIN = 1000

SST2 = register_task(PromptTask(
    "sst2", train_file="train.tsv", val_file="dev.tsv",
    template="{sentence}\nThe sentiment of the given sentence is:",
    label_words={0: "negative", 1: "positive"},
    dev_from_train=SST2_DEV_FROM_TRAIN,
    hub_ids=[("glue", "sst2"), ("nyu-mll/glue", "sst2")]))

# the RTE template (the paper gives one for both NLI tasks): sentence 1 = question, 2 = sentence
QNLI = register_task(PromptTask(
    "qnli", train_file="train.tsv", val_file="dev.tsv",
    template=nli_template("question", "sentence"), label_words=NLI_LABEL_WORDS,
    dev_from_train=QNLI_DEV_FROM_TRAIN,
    hub_ids=[("glue", "qnli"), ("nyu-mll/glue", "qnli")]))
