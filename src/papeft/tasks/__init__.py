"""Task registry: COPA, BoolQ, RTE (SuperGLUE) and SST-2 (GLUE) as prompt -> response tasks.

    from papeft.tasks import get_task
    splits = get_task("copa").load(cfg.task, data_root)   # Splits(train, dev, test, notes)
    accuracy = get_task("copa").score(predictions, splits.test)
"""
from __future__ import annotations

from . import generation, glue, instruction, qa, superglue, wikisql  # noqa: F401  (registers the tasks)
from .base import TASKS, DataError, Evaluation, Example, Splits, Task, get_task, register_task
from .prompt_task import PromptTask

__all__ = ["DataError", "Evaluation", "Example", "PromptTask", "Splits", "TASKS", "Task", "get_task", "register_task"]
