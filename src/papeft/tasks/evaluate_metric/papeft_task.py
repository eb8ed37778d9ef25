"""papeft's task metrics as one `evaluate` module; the configuration name is the task's name.

    evaluate.load("src/papeft/tasks/evaluate_metric/papeft_task.py", "copa")

Scores are papeft's own (`papeft.tasks.evaluate_metric.task_scores`); see that package for
each task's inputs and metrics.
"""
import datasets
import evaluate

from papeft.tasks.evaluate_metric import task_names, task_scores

DESCRIPTION = """papeft's task metrics, in percent (0..100), computed by the task's own scoring code:
accuracy (copa, rte, boolq, sst2, qnli; the longest matching label wins), SQuAD f1_em / em / f1
(squad, record), ROUGE-L and corpus BLEU (e2e), final-number accuracy (gsm8k), execution accuracy
in a SQL sandbox (wikisql), ROUGE-L against GPT-4's reference answers (alpaca_mtbench)."""

INPUTS = """
Args:
    predictions: list of generated strings.
    references: per prediction, its gold answers (a list of strings, or one string); for wikisql
        the gold SQL; for alpaca_mtbench the turn's reference answer ("" when there is none).
    tables: wikisql only: per prediction, its table as an official tables.jsonl JSON line.
Returns:
    {main metric: value, other metrics...}, e.g. {"f1_em": 81.2, "em": 75.0, "f1": 87.4} for squad.
"""


class PapeftTask(evaluate.Metric):
    def _info(self):
        if self.config_name not in task_names():
            raise KeyError(f"papeft_task: configuration '{self.config_name}' is not a task; "
                           f"pass one of {task_names()} as the second argument of evaluate.load")
        text = datasets.Value("string")
        if self.config_name == "wikisql":
            features = datasets.Features({"predictions": text, "references": text, "tables": text})
        elif self.config_name == "alpaca_mtbench":
            features = datasets.Features({"predictions": text, "references": text})
        else:
            features = [datasets.Features({"predictions": text, "references": datasets.Sequence(text)}),
                        datasets.Features({"predictions": text, "references": text})]
        return evaluate.MetricInfo(description=DESCRIPTION, citation="", inputs_description=INPUTS,
                                   features=features)

    def _compute(self, predictions, references, tables=None):
        return task_scores(self.config_name, predictions, references, tables)
