"""Tests for papeft.report.tables: medians, IQR, skipping bad runs, table formats, CLI, atomic writes."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from papeft.report import tables as report
from papeft.report.formats import format_params, to_csv, to_latex, to_markdown
from papeft.report.rows import floors, quantile
from papeft.report.tables import collect, median_table, write_tables

SRC = Path(__file__).resolve().parents[1] / "src"


def rec(method="parade", task="copa", seed=0, score=55.0, backbone="smollm2_135m", **kw) -> dict:
    base = {"backbone": backbone, "method": method, "task": task, "seed": seed,
            "metric": "accuracy", "score": score, "params_trainable": 1234,
            "params_trainable_no_bias": 1000, "train_time_s": 1.0,
            "train_tokens_per_s": 10.0, "split_protocol": "paper", "notes": [],
            "status": "complete"}
    return {**base, **kw}


def put(root: Path, name: str, data: dict | str) -> Path:
    path = root / name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def cell(rows, method, task):
    return next(r for r in rows if r.method == method).cells[task]


def test_median_odd_and_even_seed_counts():
    rows = median_table([rec("a", seed=0, score=50), rec("a", seed=1, score=90),
                         rec("a", seed=2, score=60),
                         rec("b", seed=0, score=50), rec("b", seed=1, score=60)])
    assert cell(rows, "a", "copa").median == 60.0
    assert cell(rows, "b", "copa").median == 55.0
    assert cell(rows, "a", "copa").n == 3 and cell(rows, "b", "copa").n == 2


def test_iqr_linear_interpolation():
    rows = median_table([rec(seed=i, score=s) for i, s in enumerate([1, 2, 3, 4])])
    # q25 at position 0.75 -> 1.75, q75 at position 2.25 -> 3.25
    assert cell(rows, "parade", "copa").iqr == pytest.approx(1.5)
    one = median_table([rec(score=70)])
    assert cell(one, "parade", "copa").iqr == 0
    assert quantile([10, 20, 30, 40, 50], 0.75) == 40


def test_incomplete_and_corrupt_runs_not_counted(tmp_path):
    put(tmp_path, "ok", rec(seed=0, score=50))
    put(tmp_path, "partial", rec(seed=1, score=99, status="running"))
    bad = put(tmp_path, "corrupt", '{"backbone": "smollm2_135m", "score": ')
    nokeys = put(tmp_path, "nokeys", {"status": "complete", "score": 10})
    with pytest.warns(UserWarning) as caught:
        records = collect(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert str(bad) in messages and str(nokeys) in messages
    assert len(records) == 1
    rows = median_table(records)
    assert cell(rows, "parade", "copa").scores == [50.0]


def test_duplicate_seed_keeps_the_last_by_path_whatever_the_file_times(tmp_path):
    old = put(tmp_path, "a_first", rec(score=10))
    new = put(tmp_path, "b_second", rec(score=80))
    os.utime(old, (2_000_000, 2_000_000))                           # a checkout sets times at random
    os.utime(new, (1_000_000, 1_000_000))
    records = collect(tmp_path)
    with pytest.warns(UserWarning, match="duplicate"):
        rows = median_table(records)
    assert cell(rows, "parade", "copa").scores == [80.0]
    with warnings.catch_warnings(record=True) as caught:            # the whole report names it once
        warnings.simplefilter("always")
        write_tables([tmp_path], tmp_path / "table", reference="parade")
    assert [str(w.message) for w in caught if str(w.message).startswith("duplicate")] == [
        f"duplicate run ('smollm2_135m', 'parade', 'copa', 0): keeping {new}, ignoring {old}"]


def test_missing_cell_markdown_dash_csv_empty():
    rows = median_table([rec("a", "copa", score=50), rec("a", "rte", score=70),
                         rec("b", "copa", score=60)])
    md = to_markdown(rows)
    b_line = next(l for l in md.splitlines() if l.startswith("| smollm2_135m | b |"))
    assert b_line.rstrip(" |").endswith("–")
    assert "copa (accuracy)" in md and "rte (accuracy)" in md
    table = list(csv.DictReader(io.StringIO(to_csv(rows))))
    b = next(r for r in table if r["method"] == "b")
    assert b["rte_median"] == "" and b["rte_n"] == "" and b["rte_iqr"] == ""
    assert b["copa_median"] == "60.0" and b["params"] == "1000"


def test_n_flag_and_params_format():
    rows = median_table([rec("a", seed=0), rec("a", seed=1), rec("b", seed=0,
                         params_trainable_no_bias=8_950_000)])
    md = to_markdown(rows)
    assert "(n=1)" in md and "8.95M" in md
    assert format_params(123_400) == "123.4K" and format_params(512) == "512"


def test_latex_marks_escapes_and_balance():
    rows = median_table([rec("my_best", score=90), rec("second", score=80),
                         rec("third", score=70), rec("tied_3rd", score=70),
                         rec("my_best", task="rte", score=40, notes=["50% & #1_note"])])
    tex = to_latex(rows, report.collect_notes([rec(notes=["50% & #1_note --out x"])]))
    assert r"\textbf{90.0}" in tex and r"\underline{80.0}" in tex
    assert r"\textbf{70.0}" not in tex and r"\underline{70.0}" not in tex
    assert r"my\_best" in tex and "my_best" not in tex.replace(r"my\_best", "")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"50\% \& \#1\_note -{}-out x" in tex        # `--` kept as two hyphens, not an en dash
    body = tex.split(r"\toprule")[1].split(r"\bottomrule")[0]
    rows_tex = [l for l in body.splitlines() if l.endswith(r"\\")]
    counts = {l.replace(r"\&", "").count("&") for l in rows_tex}
    assert len(rows_tex) == 5 and counts == {4}  # 3 fixed columns + 2 tasks
    assert r"\textbf{40.0}" not in tex  # single value in a column: no mark


def test_latex_ties_share_mark():
    rows = median_table([rec("a", score=90), rec("b", score=90), rec("c", score=80)])
    tex = to_latex(rows)
    assert tex.count(r"\textbf{90.0}") == 2 and r"\underline{80.0}" in tex


def test_each_backbone_is_ranked_against_its_own_floor():
    big, small = {"majority_class": {"label": "x", "score": 85.0}}, {"majority_class": {"label": "x", "score": 50.0}}
    rows = median_table([rec("a", score=84, backbone="big", **big), rec("zero_shot", score=20, backbone="big"),
                         rec("a", score=80, backbone="small", **small), rec("b", score=70, backbone="small", **small),
                         rec("c", score=60, backbone="small", **small), rec("zero_shot", score=65, backbone="small")])
    assert floors(rows) == {("big", "copa"): 85.0, ("small", "copa"): 65.0}   # the better of majority / zero-shot
    md = to_markdown(rows)
    assert "| 84.0 |" in md                                      # under big's floor: no mark
    assert "**80.0**" in md and "_70.0_" in md and "| 60.0 |" in md   # small: ranked above its own 65.0
    loss = median_table([rec("a", score=1.0, metric="loss"), rec("zero_shot", score=3.0, metric="loss"),
                         rec("zero_shot", score=2.0, metric="loss", backbone="other")])
    assert floors(loss) == {("smollm2_135m", "copa"): 3.0, ("other", "copa"): 2.0}


def test_markdown_bold_and_notes():
    rows = median_table([rec("a", score=90), rec("b", score=80)])
    md = to_markdown(rows, ["split_protocol=dev_only: x"])
    assert "**90.0**" in md and "**80.0**" not in md
    assert "- split_protocol=dev_only: x" in md


def test_write_tables_atomic_via_io(tmp_path, monkeypatch):
    put(tmp_path / "runs", "r0", rec(score=50))
    written = []
    real = report.write_text
    monkeypatch.setattr(report, "write_text", lambda p, t: (written.append(Path(p)), real(p, t)))
    paths = write_tables([tmp_path / "runs", rec("other", score=60)], tmp_path / "out" / "median")
    assert set(paths) == {"md", "csv", "tex"}
    assert sorted(written) == sorted(paths.values())
    assert all(p.exists() for p in paths.values())
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob(".*"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "papeft.report", *map(str, args)],
                          capture_output=True, text=True, env=env)


def test_cli_writes_three_files(tmp_path):
    put(tmp_path, "a/s0", rec(seed=0, score=50, notes=["split_protocol=dev_only: y"]))
    put(tmp_path, "a/s1", rec(seed=1, score=60))
    res = run_cli(tmp_path)
    assert res.returncode == 0, res.stderr
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / f"median.{ext}").is_file()
    assert "55.0" in res.stdout and "split_protocol=dev_only" in res.stdout
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".median*"))
    out = tmp_path / "tables"
    assert run_cli(tmp_path, "--out", out, "--name", "t").returncode == 0
    assert (out / "t.csv").is_file()


def test_cli_empty_dir_fails_naming_dir(tmp_path):
    res = run_cli(tmp_path)
    assert res.returncode != 0
    assert str(tmp_path) in res.stderr and "metrics.json" in res.stderr
    assert not list(tmp_path.iterdir())


def failure(method="b", task="copa", seed=0, **kw) -> dict:
    return {"status": "failed", "backbone": "smollm2_135m", "method": method, "task": task, "seed": seed,
            "error_type": "DataError", "error": "boolq/train.jsonl not found\nmore", **kw}


def test_iqr_shown_and_failed_cells_never_a_number(tmp_path):
    recs = [rec("a", seed=i, score=s) for i, s in enumerate([1, 2, 3, 4])] + [rec("b", "rte", score=60)]
    rows = median_table(recs, [failure("b", "copa", s) for s in range(2)] + [failure("a", "copa", 9)])
    md, tex = to_markdown(rows, failures=[failure("b")]), to_latex(rows, failures=[failure("b")])
    a_line = next(line for line in md.splitlines() if line.startswith("| smollm2_135m | a |"))
    b_line = next(line for line in md.splitlines() if line.startswith("| smollm2_135m | b |"))
    assert "2.5 [1.5]" in a_line and "(n=4, 1 failed)" in a_line      # median [IQR]; 5 expected, 1 failed
    assert b_line.split("|")[4].strip() == "failed" and "Failed runs:" in md and "DataError" in md
    assert r"\textit{failed}" in tex and r"\,{\scriptsize[1.5]}" in tex
    assert r"Failed: smollm2\_135m / b / copa / seed 0: DataError: boolq/train.jsonl not found" in tex
    table = {r["method"]: r for r in csv.DictReader(io.StringIO(to_csv(rows)))}
    assert table["b"]["copa_median"] == "" and table["b"]["copa_failed"] == "2" and table["a"]["copa_iqr"] == "1.5"
    assert "[" not in to_markdown(rows, iqr=False).split("\n\n")[0].replace("[interquartile", "")


def test_failure_with_a_complete_twin_is_not_counted():
    rows = median_table([rec("a", seed=0)], [failure("a", "copa", 0)])
    assert cell(rows, "a", "copa").failed == 0 and cell(rows, "a", "copa").n == 1


def test_paper_rows_follow_ours_in_the_papers_order(tmp_path):
    put(tmp_path, "p", rec("parade", "copa", score=70))
    put(tmp_path, "l", rec("lora", "copa", score=60))
    put(tmp_path, "r", rec("lora", "rte", score=55))
    paths = write_tables([tmp_path], tmp_path / "t1", paper="table1")
    md, tex = paths["md"].read_text(), paths["tex"].read_text()
    body = [line for line in md.splitlines() if line.startswith("| ")]
    assert body[0].startswith("| backbone | method | params | rte (accuracy) | copa (accuracy) |")  # paper's order
    assert [line.split("|")[2].strip() for line in body[1:3]] == ["lora", "parade"]             # paper's row order
    assert "| llama2_7b (paper) | PARADE | 8.9M | 83.7 | 91.8 |" in md
    assert "| llama2_7b (paper) | LoRA | 10.0M | 82.6 | 90.7 |" in md
    assert tex.count(r"\midrule") == 2 and "llama2\\_7b (paper) & (IA)3 & 9.8M & 82.7 & 90.7" in tex
    assert r"\textbf{70.0}" in tex and r"\textbf{91.8}" not in tex      # marks rank our runs only


def test_budget_series_and_figure(tmp_path):
    from papeft.report import plots
    recs = [rec(f"parade_r{r}", "boolq", seed=s, score=60 + r + s, params_trainable_no_bias=1000 * r)
            for r in (4, 8, 12) for s in range(3)]
    recs += [rec("lora_r2", "boolq", score=50, params_trainable_no_bias=3000), rec("ia3", "boolq", score=40)]
    series = report.budget_series(recs)
    assert list(series) == ["boolq"] and list(series["boolq"]) == ["parade"]      # one budget: no line
    assert series["boolq"]["parade"][0] == (4000, 65.0, 64.5, 65.5)
    paths = plots.plot_budget(series["boolq"], tmp_path / "budget-boolq")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)


def test_cli_plots_and_paper(tmp_path):
    for r in (4, 8):
        put(tmp_path, f"r{r}", rec(f"parade_r{r}", params_trainable_no_bias=100 * r, score=50 + r))
    res = run_cli(tmp_path, "--plots", "--paper", "table6", "--no-iqr")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "plots/budget-copa.png").is_file() and (tmp_path / "plots/budget-copa.pdf").is_file()
    assert "(paper) | PARADE-4" in res.stdout
    assert run_cli(tmp_path, "--paper", "table5").returncode == 1


def test_the_figure_index_lists_each_run_figure_beside_its_run_whether_or_not_this_clone_has_it(tmp_path):
    elsewhere = "/machine/that/trained/runs/pedro/seed0/rational_activations.png"     # the path the run recorded
    runs = tmp_path / "runs"
    for seed in (0, 1):
        put(runs, f"pedro/seed{seed}", rec("pedro", seed=seed, score=50 + seed, artifacts=[elsewhere]))
    put(runs, "lora/seed0", rec("lora", score=52.0))
    (runs / "pedro/seed0/rational_activations.png").write_bytes(b"png")              # only this machine has it
    index = report.write_plots(runs, tmp_path / "out" / "plots")[-1]
    text = index.read_text()
    assert "- [../../runs/pedro/seed0/rational_activations.png](../../runs/pedro/seed0/rational_activations.png)" in text
    assert "../../runs/pedro/seed1/rational_activations.png" in text and "/machine/" not in text
    (runs / "pedro/seed0/rational_activations.png").unlink()                          # a fresh clone: same bytes
    assert report.write_plots(runs, tmp_path / "out" / "plots")[-1].read_text() == text


def test_tables_name_the_commits_of_their_runs(tmp_path):
    env = lambda sha, dirty: {"git": {"commit": sha, "dirty": dirty}}      # noqa: E731
    put(tmp_path, "a", rec(seed=0, environment=env("a" * 40, False)))
    put(tmp_path, "b", rec(seed=1, environment=env("a" * 40, False)))
    paths = write_tables([tmp_path], tmp_path / "one")
    assert "Code: papeft commit aaaaaaa." in paths["md"].read_text()
    assert "aaaaaaa" in paths["tex"].read_text()
    put(tmp_path, "c", rec(seed=2, environment=env("b" * 40, True)))
    put(tmp_path, "d", rec(seed=3))                                          # a run from before provenance
    md = write_tables([tmp_path], tmp_path / "mixed")["md"].read_text()
    assert "aaaaaaa (2 runs), bbbbbbb+dirty (1 run), unknown (run predates provenance) (1 run)" in md


def test_a_method_whose_every_seed_is_nan_keeps_its_row_and_says_why(tmp_path):
    judge = {"judge_missing": 160.0, "n_judged": 0.0, "rouge_l": 21.5}
    for seed in (0, 1):
        put(tmp_path, f"a/s{seed}", rec("a", seed=seed, score=float("nan"), metric="judge_score", metrics=judge))
        put(tmp_path, f"b/s{seed}", rec("b", seed=seed, score=50 + seed, metric="judge_score"))
    put(tmp_path, "c/s0", rec("c", seed=0, score=float("nan"), metric="judge_score"))
    put(tmp_path, "c/s1", rec("c", seed=1, score=40, metric="judge_score"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_tables([tmp_path], tmp_path / "median")
    md, tex = paths["md"].read_text(), paths["tex"].read_text()
    a_line = next(line for line in md.splitlines() if line.startswith("| smollm2_135m | a |"))
    c_line = next(line for line in md.splitlines() if line.startswith("| smollm2_135m | c |"))
    assert a_line.split("|")[4].strip() == "NaN" and "| 40.0 (n=1, 1 NaN) |" in c_line    # short: no mark
    why = md.split("Runs without a score:")[1]
    assert why.count("judge_score is NaN") == 3 and "judge_missing=160, n_judged=0" in why
    assert str(tmp_path / "a/s0/metrics.json") in why and "`NaN`" in md
    assert "NaN" in tex and "Without a score" in tex
    table = {r["method"]: r for r in csv.DictReader(io.StringIO(paths["csv"].read_text()))}
    assert table["a"]["copa_nan"] == "2" and table["a"]["copa_median"] == "" and table["b"]["copa_median"] == "50.5"
    assert not [w for w in caught if "skipping" in str(w.message)]


BROKEN_FIELDS = {
    "params_text": {"params_trainable_no_bias": "abc"}, "seed_list": {"seed": [0]}, "seed_text": {"seed": "0"},
    "seed_bool": {"seed": True}, "backbone_object": {"backbone": {"name": "x"}}, "task_null": {"task": None},
    "method_empty": {"method": ""}, "notes_number": {"notes": 5}, "artifacts_text": {"artifacts": "fig.png"},
    "metrics_list": {"metrics": [1, 2]}, "score_text": {"score": "high"}, "score_inf": {"score": float("inf")},
    "metric_list": {"metric": ["accuracy"]}, "params_negative": {"params_trainable_no_bias": -5},
}


def test_a_malformed_field_skips_that_file_naming_it_and_the_report_goes_on(tmp_path):
    put(tmp_path, "good/s0", rec("good", seed=0, score=60))
    put(tmp_path, "good/s1", rec("good", seed=1, score=70))
    for name, fields in BROKEN_FIELDS.items():
        put(tmp_path, f"broken/{name}", {**rec("broken", seed=0, score=99), **fields})
    bad_failure = tmp_path / "failed_seed_object" / "failed.json"
    bad_failure.parent.mkdir()
    bad_failure.write_text(json.dumps({"status": "failed", "backbone": "smollm2_135m", "method": "broken",
                                       "task": "copa", "seed": {"n": 0}, "error": "x"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_tables([tmp_path], tmp_path / "median")
    said = "\n".join(str(w.message) for w in caught)
    for name in BROKEN_FIELDS:
        assert f"skipping {tmp_path / 'broken' / name / 'metrics.json'}" in said, name
    assert f"skipping {bad_failure}" in said
    md = paths["md"].read_text()
    assert "| good |" in md and "65.0" in md and "broken" not in md
    assert run_cli(tmp_path).returncode == 0


def test_runs_of_one_process_record_the_commit_it_started_on(monkeypatch):
    """A sweep runs for hours while commits land: its cells keep the commit of the code it loaded."""
    from papeft.report import provenance
    provenance.process_git_state.cache_clear()
    states = iter([{"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}])
    monkeypatch.setattr(provenance, "git_state", lambda: next(states))
    try:
        assert provenance.environment()["git"] == provenance.environment()["git"] == {"commit": "a" * 40,
                                                                                     "dirty": False}
    finally:
        provenance.process_git_state.cache_clear()


def test_a_benchmark_names_the_last_commit_that_changed_code_not_the_results_since(tmp_path):
    from papeft.report.provenance import code_commit

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-q", "-m", "code")
    code = git("rev-parse", "HEAD")[:7]
    (tmp_path / "results").mkdir()
    (tmp_path / "results/cell.json").write_text("{}")
    git("add", "-A")
    git("commit", "-q", "-m", "a cell")                          # HEAD moves, the code does not
    assert code_commit(tmp_path) == code
    (tmp_path / "src/a.py").write_text("x = 2\n")
    assert code_commit(tmp_path) == code + "+dirty"
    assert code_commit(tmp_path / "src") == code + "+dirty"        # any folder of the checkout
