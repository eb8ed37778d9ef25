"""The GLUE task SST-2 (PARADE, Appendix C template), built from the shared `PromptTask` loader.

SST-2 is a large dataset, so under the paper protocol 1,000 rows of the official train file
(split_seed shuffle) become the dev set, the rest is train, and the official dev.tsv is the test set.
"""
from __future__ import annotations

from .base import register_task
from .superglue import PromptTask

SST2_DEV_FROM_TRAIN = 1000

SST2 = register_task(PromptTask(
    "sst2", train_file="train.tsv", val_file="dev.tsv",
    template="{sentence}\nThe sentiment of the given sentence is:",
    label_words={0: "negative", 1: "positive"},
    dev_from_train=SST2_DEV_FROM_TRAIN,
    hub_ids=[("glue", "sst2"), ("nyu-mll/glue", "sst2")]))
