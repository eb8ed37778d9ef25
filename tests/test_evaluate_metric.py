"""Every task's metric as an offline `evaluate` module: the numbers a run reports (Task.evaluate on the
same predictions) come back from evaluate.load(<local path>, task).compute(predictions.jsonl columns)."""
from pathlib import Path

import evaluate
import pytest

from papeft.tasks import Example, get_task
from papeft.tasks.evaluate_metric import METRIC_PATH, compute_inputs, task_names
from papeft.tasks.instruction import InstructionTask, MTBenchExample

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def ex(task, i, answers):
    return Example(f"{task}/test/{i}", f"prompt {i}", answers[0], tuple(answers))


def label_case(task, right, wrong):
    """Two hits (one a prefix: "yes, because"), two wrong labels, and no label at all."""
    examples = [ex(task, i, [label]) for i, label in enumerate([right, right, wrong, right, right])]
    return examples, [right, f"{right}, because", right, wrong, "maybe"]


CASES = {
    "copa": lambda: label_case("copa", "1", "2"),
    "boolq": lambda: label_case("boolq", "yes", "no"),
    "sst2": lambda: label_case("sst2", "positive", "negative"),
    "rte": lambda: ([ex("rte", i, [g]) for i, g in enumerate(["entailment", "entailment", "not entailment"])],
                    ["not entailment", "Entailment.", "not entailment"]),   # the longer label wins: a miss
    "qnli": lambda: ([ex("qnli", i, [g]) for i, g in enumerate(["entailment", "not entailment", "entailment"])],
                     ["entailment", "entailment", "entailment\nbecause"]),
    "squad": lambda: ([ex("squad", 0, ["Denver Broncos", "Broncos"]), ex("squad", 1, ["Carolina Panthers"]),
                       ex("squad", 2, ["the 50th Super Bowl"])],
                      ["the Denver Broncos!", "Panthers of Carolina, NC", "Levi's Stadium"]),
    "record": lambda: ([ex("record", 0, ["Obama", "Barack Obama"]), ex("record", 1, ["U.S."])],
                       ["President Barack Obama", "US"]),
    "e2e": lambda: ([ex("e2e", 0, ["The Eagle is a cheap pub near the river.", "Cheap pub The Eagle by the river."]),
                     ex("e2e", 1, ["Aromi serves French food in the city centre."])],
                    ["The Eagle is a cheap pub by the river.", "Aromi is a French restaurant in the centre."]),
    "gsm8k": lambda: ([ex("gsm8k", i, [g]) for i, g in enumerate(["1,450,000", "5", "3.5", "12"])],
                      ["so 1450000 in all", "#### 5\n#### 7", "It costs 3.50 dollars", "no idea"]),
}


def run_and_score(task_name, examples, predictions, task=None):
    """(what a run reports, what `evaluate` computes from the run's predictions.jsonl rows)."""
    task = task or get_task(task_name)
    answers = iter([predictions] if not isinstance(predictions[0], list) else predictions)
    run = task.evaluate(lambda prompts: next(answers), examples)
    metric = evaluate.load(METRIC_PATH, task_name)
    return run, metric.compute(**compute_inputs(task_name, run.rows, examples))


def assert_same(run, scores, main):
    assert scores[main] == run.score
    for key, value in scores.items():
        if key != main:
            assert value == run.metrics[key], key


@pytest.mark.parametrize("task_name", sorted(CASES))
def test_same_numbers_as_the_run(task_name):
    examples, predictions = CASES[task_name]()
    run, scores = run_and_score(task_name, examples, predictions)
    task = get_task(task_name)
    assert set(scores) == {task.metric, *task.extra_metrics(predictions, examples)}
    assert_same(run, scores, task.metric)
    assert 0 < scores[task.metric] < 100                # some right, some wrong: the comparison can fail


def test_wikisql_execution_accuracy(tmp_path):
    task = get_task("wikisql")
    examples = task.load({"split_protocol": "dev_only"}, str(FIXTURES)).test[:4]
    predictions = [examples[0].response, f"```sql\n{examples[1].response}\n```",
                   "SELECT COUNT(*) FROM t", "DROP TABLE t"]
    run, scores = run_and_score("wikisql", examples, predictions)
    assert_same(run, scores, "execution_accuracy")
    assert scores["execution_accuracy"] == 50.0                 # gold, fenced gold; wrong, hostile
    assert scores["logical_form_accuracy"] == run.metrics["logical_form_accuracy"] == 50.0
    inputs = compute_inputs("wikisql", run.rows, examples)
    assert inputs["tables"][0].startswith('{"id": "') and inputs["references"][0] == examples[0].response


def test_mt_bench_rouge_l():
    refs = (("Paris is the capital of France.", "About two million people live there."), ())
    bench = [MTBenchExample(f"alpaca_mtbench/test/{i}", t[0], "", (), 101 + i, "writing", t, r)
             for i, (t, r) in enumerate(zip([("Capital of France?", "Population?"), ("Write a poem.", "Shorter.")],
                                            refs))]
    task = InstructionTask()
    task.judge_cfg = {"enabled": False}
    turns = [["The capital of France is Paris.", "Roses are red."], ["Two million live in Paris.", "Red."]]
    run, scores = run_and_score("alpaca_mtbench", bench, turns, task=task)
    assert scores == {"rouge_l": run.metrics["rouge_l"]} and 0 < scores["rouge_l"] < 100


def test_every_task_is_a_configuration():
    assert set(task_names()) == set(CASES) | {"wikisql", "alpaca_mtbench"}
    with pytest.raises(KeyError, match="not a task"):
        evaluate.load(METRIC_PATH, "no_such_task")
