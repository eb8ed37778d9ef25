"""Every task's metric as a Hugging Face `evaluate` module loaded from this folder: no hub.

    import evaluate
    from papeft.tasks.evaluate_metric import METRIC_PATH
    squad = evaluate.load(METRIC_PATH, "squad")           # config name = task name
    squad.compute(predictions=["Denver Broncos"], references=[["Denver Broncos", "Broncos"]])
    # {'f1_em': 100.0, 'em': 100.0, 'f1': 100.0}

The module (`papeft_task.py` beside this file) only declares its inputs; the scores come from
`task_scores`, which calls the task's own `score` and `extra_metrics`: the functions a run
uses, so a number from `evaluate` is the number in `metrics.json` for the same predictions.

Inputs per task (a run's predictions.jsonl holds them as `prediction` and `answers`):
* copa, rte, boolq, sst2, qnli (accuracy), squad, record (f1_em, em, f1), e2e (rouge_l,
  bleu), gsm8k (accuracy): `references` = every gold answer of an example (a list, or one string);
* wikisql (execution_accuracy): `references` = the gold SQL, `tables` = the example's table as
  the JSON of an official `tables.jsonl` line ({id, header, types, rows}; `table_json` writes it);
* alpaca_mtbench (rouge_l; the judge score needs a judge and is not offered): one prediction per
  answered turn, `references` = that turn's GPT-4 reference answer ("" when it has none: skipped).
`compute_inputs` turns predictions.jsonl rows into these arguments.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from papeft.tasks import TASKS, Example, get_task
from papeft.tasks.wikisql import WikiSQLExample
from papeft.tasks.wikisql_rows import Table, parse_table

METRIC_PATH = str(Path(__file__).with_name("papeft_task.py"))
SCORE_NAMES = {"alpaca_mtbench": "rouge_l"}   # the task's `score` there is ROUGE-L; its `metric` is the judge's


def task_names() -> list[str]:
    return sorted(TASKS)


def table_json(table: Table) -> str:
    """A loaded WikiSQL table as the JSON of an official `tables.jsonl` line."""
    return json.dumps({"id": table.id, "header": list(table.columns), "types": list(table.types),
                       "rows": [list(row) for row in table.rows]})


def examples_for(task_name: str, references: Sequence[str | Sequence[str]],
                 tables: Sequence[str | Mapping] | None = None) -> list[Example]:
    """Examples that carry just what scoring reads: the gold answers (and WikiSQL's tables)."""
    examples = []
    for i, refs in enumerate(references):
        answers = (refs,) if isinstance(refs, str) or refs is None else tuple(refs)
        if not answers:
            raise ValueError(f"references[{i}] is an empty list; expected the example's gold answer(s)")
        uid = f"{task_name}/evaluate/{i}"
        if task_name == "wikisql":
            if tables is None or len(tables) != len(references):
                raise ValueError(f"wikisql needs one table per reference (`tables`), got "
                                 f"{0 if tables is None else len(tables)} for {len(references)}")
            raw = json.loads(tables[i]) if isinstance(tables[i], str) else tables[i]
            table = parse_table(raw, f"tables[{i}]")
            # query=None: scoring runs the gold SQL (`response`), never the structured query
            examples.append(WikiSQLExample(uid, "", answers[0], answers, table, None))
        else:
            examples.append(Example(uid, "", answers[0] or "", answers))
    return examples


def task_scores(task_name: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                tables: Sequence[str | Mapping] | None = None) -> dict[str, float]:
    """{main metric: task.score, **task.extra_metrics} of `predictions`, as a run reports them
    (WikiSQL: execution accuracy, logical-form accuracy, exact SQL match, failure counts)."""
    task = get_task(task_name)
    examples = examples_for(task.name, references, tables)
    predictions = [str(p) for p in predictions]
    main = SCORE_NAMES.get(task.name, task.metric)
    return {main: task.score(predictions, examples), **task.extra_metrics(predictions, examples)}


def compute_inputs(task_name: str, rows: Sequence[Mapping[str, Any]],
                   examples: Sequence[Example] | None = None) -> dict[str, list]:
    """`compute(**...)` arguments from predictions.jsonl rows; WikiSQL also needs the loaded
    `examples` (a split of `get_task("wikisql").load(...)`) for their tables, matched by uid."""
    if task_name == "alpaca_mtbench":                    # one row per question, one prediction per turn
        predictions, references = [], []
        for r in rows:
            refs = list(r.get("answers") or [])
            for turn, answer in enumerate(r["prediction"]):
                predictions.append(answer)
                references.append(refs[turn] if turn < len(refs) else "")
        return {"predictions": predictions, "references": references}
    inputs = {"predictions": [r["prediction"] for r in rows], "references": [list(r["answers"]) for r in rows]}
    if task_name == "wikisql":
        if examples is None:
            raise ValueError("wikisql rows need the loaded examples for their tables (examples=splits.test)")
        by_uid = {e.uid: e for e in examples}
        missing = [r["uid"] for r in rows if r["uid"] not in by_uid]
        if missing:
            raise ValueError(f"predictions for uids {missing[:3]} are not among the {len(by_uid)} examples given")
        inputs["references"] = [r["answers"][0] for r in rows]
        inputs["tables"] = [table_json(by_uid[r["uid"]].table) for r in rows]
    return inputs
