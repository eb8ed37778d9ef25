"""Task registry: the paper's tasks as prompt -> response examples, all loaded one way (`base.Task.load`).

    base.py             Example, Splits, TaskConfig, Task (the loading template), readers, split helpers, accuracy
    prompt_task.py      PromptTask: official files (or hub rows) filled into a prompt template, paper/dev_only splits
    superglue.py        COPA, BoolQ, RTE          glue.py   SST-2, QNLI
    generation.py       FreeTextTask; E2E, GSM8K  qa.py     SQuAD, ReCoRD
    wikisql.py          WikiSQL (rows: wikisql_rows.py; execution: sql_sandbox.py, sql_worker.py)
    instruction.py      Alpaca -> MT-Bench (judge.py); metrics.py, prompting.py (chat templates, collation)

    from papeft.tasks import get_task
    splits = get_task("copa").load(cfg.task, data_root)   # Splits(train, dev, test, notes)
    accuracy = get_task("copa").score(predictions, splits.test)
"""
from __future__ import annotations

from . import generation, glue, instruction, qa, superglue, wikisql  # noqa: F401  (registers the tasks)
from .base import TASKS, DataError, Evaluation, Example, Splits, Task, get_task, register_task
from .prompt_task import PromptTask

__all__ = ["DataError", "Evaluation", "Example", "PromptTask", "Splits", "TASKS", "Task", "get_task", "register_task"]
