"""Extractive question answering: SQuAD v1.1 and ReCoRD, scored by the mean of F1 and exact match
(max over gold answers, SQuAD normalisation). Template (PARADE, Appendix C), shared by both:

    Context:\\n{context}\\nQuestion:\\n{question}   ->   the answer span

Both are large, so under the paper protocol 1,000 training questions (split_seed shuffle) become
the dev set and the official dev/val file is the test set. Neither train file is here (over 4 MiB):
use task.split_protocol=dev_only (the validation file halved, as `PromptTask` does) or task.source=hub.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .base import Example, bad_row, read_text, register_task
from .generation import FreeTextTask, Record, list_field, text_field
from .metrics import squad_scores

QA_TEMPLATE = "Context:\n{context}\nQuestion:\n{question}"
QA_DEV_FROM_TRAIN = 1000


def qa_scores(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """f1_em (main), em and f1 in percent, each question scored against its best gold answer."""
    return squad_scores(predictions, [ex.answers for ex in examples])


class QATask(FreeTextTask):
    """A context + question -> answer span task; the training response is the first gold answer."""

    def __init__(self, name: str, **kwargs: Any):
        super().__init__(name, template=QA_TEMPLATE, metric="f1_em", scorer=qa_scores,
                         dev_from_train=QA_DEV_FROM_TRAIN, **kwargs)

    def _dev_only_note(self, seed: int, train: list, dev: list, test: list) -> str:
        return (super()._dev_only_note(seed, train, dev, test)
                + "; questions are split one by one, so questions on one passage can fall in both train and test")


# ---------------------------------------------------------------------------- SQuAD v1.1


class SquadTask(QATask):
    """SQuAD v1.1 from the official JSON (data[].paragraphs[].qas[]) or rajpurkar/squad rows.
    Rows are questions in file order (uid squad/dev-v1.1/{question index}, as the hub's rows)."""

    def read_records(self, path: Path) -> list[Record]:
        """The articles of the file; a JSON error is reported with its line and column."""
        try:
            document = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise bad_row(f"{path}: line {exc.lineno} column {exc.colno}", f"invalid JSON ({exc.msg})",
                          "the official SQuAD v1.1 JSON document") from None
        if not isinstance(document, dict):
            raise bad_row(f"{path}: line 1", f"a JSON {type(document).__name__}", 'an object {"data": [...]}')
        articles = list_field(document, "data", f"{path}: top level", "a non-empty list of articles")
        return [(f"{path}: data[{i}]", article) for i, article in enumerate(articles)]

    def flatten(self, record: Mapping[str, Any], where: str) -> list[Record]:
        rows = []
        for p, paragraph in enumerate(list_field(record, "paragraphs", where, "a list of paragraphs")):
            at = f"{where}.paragraphs[{p}]"
            context = text_field(paragraph, "context", at, "a context text and a list of qas")
            for q, qa in enumerate(list_field(paragraph, "qas", at, "a context text and a list of qas")):
                rows.append(self._row(context, qa, f"{at}.qas[{q}]"))
        return rows

    def _row(self, context: str, qa: Mapping[str, Any], where: str) -> Record:
        expected = 'a question and answers [{"text": ..., "answer_start": ...}, ...]'
        question = text_field(qa, "question", where, expected)
        answers = list_field(qa, "answers", where, expected)
        texts = [a.get("text") if isinstance(a, Mapping) else None for a in answers]
        return (where, {"context": context, "question": question, "answers": texts})

    def from_hub(self, record: Mapping[str, Any], where: str) -> list[Record]:
        """rajpurkar/squad rows: context, question, answers {"text": [...], "answer_start": [...]}."""
        answers = record.get("answers")
        texts = answers.get("text") if isinstance(answers, Mapping) else None
        return [(where, {"context": record.get("context"), "question": record.get("question"), "answers": texts})]


SQUAD = register_task(SquadTask(
    "squad", task_dir="squad_v1.1", files={"train": "train-v1.1.json", "validation": "dev-v1.1.json"},
    hub_ids=[("rajpurkar/squad", None), ("squad", None)]))


# ---------------------------------------------------------------------------- ReCoRD

HIGHLIGHT = "@highlight\n"


def record_passage(text: str) -> str:
    """Our reading: the passage with each `@highlight` line marker as "- ", as the hub's
    super_glue/record rows already have it, so local and hub prompts agree."""
    return text.replace(HIGHLIGHT, "- ")


class RecordTask(QATask):
    """ReCoRD from the official SuperGLUE jsonl (one passage per line: passage{text, entities},
    qas[{query with @placeholder, answers[{start, end, text}]}]) or super_glue/record rows
    (one query per row). Rows are queries in file order (uid record/val/{query index}).

    Our reading: the candidate entities are NOT shown; the model writes the entity itself
    (the paper's template has only context and question). The query keeps its @placeholder."""

    def flatten(self, record: Mapping[str, Any], where: str) -> list[Record]:
        passage = record.get("passage")
        text = text_field(passage if isinstance(passage, Mapping) else {}, "text", where,
                          'a "passage" object with a non-blank "text"')
        rows = []
        for k, qa in enumerate(list_field(record, "qas", where, "a non-empty list of qas")):
            at = f"{where}, qas[{k}]"
            expected = 'a query with @placeholder and answers [{"start", "end", "text"}, ...]'
            query = text_field(qa, "query", at, expected)
            answers = list_field(qa, "answers", at, expected)
            texts = [a.get("text") if isinstance(a, Mapping) else None for a in answers]
            rows.append((at, {"context": record_passage(text), "question": query, "answers": texts}))
        return rows

    def from_hub(self, record: Mapping[str, Any], where: str) -> list[Record]:
        """super_glue/record rows: passage, query, entities, answers (a list of strings)."""
        passage = record.get("passage")
        context = record_passage(passage) if isinstance(passage, str) else passage
        return [(where, {"context": context, "question": record.get("query"), "answers": record.get("answers")})]


RECORD = register_task(RecordTask(
    "record", task_dir="record", files={"train": "train.jsonl", "validation": "val.jsonl"},
    hub_ids=[("super_glue", "record"), ("aps/super_glue", "record")]))
