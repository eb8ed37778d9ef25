"""The reproduction report: floor rows, 95% bootstrap intervals, paired differences, claims with
verdicts, the protocol in every caption, and the learning-rate selection record (dev loss only)."""
from __future__ import annotations

import csv
import json
import os
import random
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from papeft.report.claims import FAILS, HOLDS, UNDECIDED
from papeft.report.intervals import cell_interval, paired_interval
from papeft.report.selection import main as selection_main
from papeft.report.tables import main as report_main, write_tables

N_TEST = 200


def write_run(root: Path, method: str, seed: int, accuracy: float, task: str = "sst2", lr: float = 1e-3,
              majority: float = 50.0, dev_loss: float = 0.5, extra: dict | None = None, cuts=()) -> Path:
    """A finished run whose predictions are right on the first `accuracy`% of a seed-shuffled test set."""
    run = root / "smollm2_135m" / method / task / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    order = list(range(N_TEST))
    random.Random(seed * 7 + len(method)).shuffle(order)
    right = set(order[:round(accuracy * N_TEST / 100)])
    rows = []
    for i in range(N_TEST):
        gold = "positive" if i % 2 else "negative"
        wrong = "negative" if gold == "positive" else "positive"
        rows.append({"uid": f"{task}/dev/{i}", "prediction": gold if i in right else wrong, "answers": [gold]})
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    score = 100.0 * len(right) / N_TEST
    (run / "config.yaml").write_text(OmegaConf.to_yaml({"trainer": {"lr": lr, "max_steps": 48}, "cuts": list(cuts)}))
    metrics = {"backbone": "smollm2_135m", "method": method, "task": task, "seed": seed, "metric": "accuracy",
               "score": score, "params_trainable_no_bias": 0 if method == "zero_shot" else 1000 + len(method),
               "status": "complete", "majority_class": {"label": "positive", "score": majority},
               "n_train": 100, "n_dev": 50, "n_test": N_TEST, "steps": 48, "batch_size": 16,
               "split_protocol": "full_test", "num_beams": 1, "precision": "fp32", "best_dev_loss": dev_loss,
               "best_step": 48, "dev_history": [{"step": 24, "dev_loss": dev_loss + 0.1, "train_loss": 1.0},
                                                {"step": 48, "dev_loss": dev_loss, "train_loss": 0.5}],
               **(extra or {})}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


def sweep(root: Path, accuracies: dict[str, list[float]], **kwargs) -> None:
    for method, scores in accuracies.items():
        for seed, acc in enumerate(scores):
            write_run(root, method, seed, acc, **kwargs)


def test_floor_rows_come_first_unmarked_and_never_short_of_seeds(tmp_path):
    sweep(tmp_path, {"parade": [80, 82, 81, 79, 83], "lora": [70, 71, 72, 69, 70], "zero_shot": [40]}, majority=50.0)
    paths = write_tables([tmp_path], tmp_path / "median")
    lines = [line for line in paths["md"].read_text().splitlines() if line.startswith("| smollm2")]
    assert [line.split(" | ")[1] for line in lines] == ["majority class", "zero_shot", "lora", "parade"]
    assert "| 50.0 |" in lines[0] and "| 40.0 |" in lines[1]            # no bold, no (n=1) on floor rows
    assert "**81.0**" in lines[3] and "_70.0_" in lines[2]
    text = paths["md"].read_text()
    assert "Learning rate per method: lora 0.001; parade 0.001." in text
    assert "sst2: split_protocol full_test; train / dev / test 100 / 50 / 200; 48 steps at batch 16." in text


def test_cell_interval_covers_its_median_and_is_deterministic(tmp_path):
    sweep(tmp_path, {"parade": [80, 82, 81, 79, 83]})
    from papeft.report.reproduction import group_runs
    from papeft.report.tables import collect
    runs = group_runs(collect(tmp_path))[("smollm2_135m", "parade", "sst2")]
    seeds = sorted(runs)
    iv = cell_interval([runs[s][0] for s in seeds], [runs[s][1] for s in seeds])
    assert iv.examples and iv.n_seeds == 5 and iv.estimate == 81.0
    assert iv.low < 81.0 < iv.high and iv.high - iv.low < 20
    assert iv == cell_interval([runs[s][0] for s in seeds], [runs[s][1] for s in seeds])
    only_seeds = cell_interval([runs[s][0] for s in seeds], [None] * 5)      # no per-example scores
    assert not only_seeds.examples and 79.0 <= only_seeds.low <= only_seeds.high <= 83.0


def test_paired_difference_sign_and_width(tmp_path):
    sweep(tmp_path, {"parade": [80, 82, 81, 79, 83], "lora": [60, 61, 62, 59, 60], "ia3": [80, 81, 82, 80, 82]})
    from papeft.report.reproduction import group_runs
    from papeft.report.tables import collect
    groups = group_runs(collect(tmp_path))
    key = lambda m: ("smollm2_135m", m, "sst2")                                         # noqa: E731
    better = paired_interval(groups[key("parade")], groups[key("lora")])
    assert better.estimate == 20.0 and better.low > 0 and better.excludes_zero()
    worse = paired_interval(groups[key("lora")], groups[key("parade")])
    assert worse.high < 0
    even = paired_interval(groups[key("parade")], groups[key("ia3")])
    assert even.low < 0 < even.high


def test_no_best_or_second_mark_at_or_under_the_floor(tmp_path):
    sweep(tmp_path, {"parade": [52, 53, 51], "lora": [58, 57, 59], "ia3": [61, 62, 60]}, task="rte", majority=59.0)
    md = write_tables([tmp_path], tmp_path / "median")["md"].read_text()
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| smollm2")}
    assert "**" not in rows["lora"] + rows["parade"] and "_" not in rows["lora"].replace("smollm2_135m", "")
    assert "| 61.0 [1.0] |" in rows["ia3"]                  # the one cell above 59.0: nothing to rank it against
    sweep(tmp_path, {"bitfit": [70, 70, 70], "houlsby": [65, 65, 65]}, task="rte", majority=59.0)
    write_run(tmp_path, "adalora", 0, 70, task="rte", majority=59.0)           # ties the best, one seed short
    md = write_tables([tmp_path], tmp_path / "median")["md"].read_text()
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| smollm2")}
    assert "**70.0**" in rows["bitfit"] and "_65.0_" in rows["houlsby"] and "| 70.0 (n=1) |" in rows["adalora"]


def test_report_cli_writes_intervals_paired_and_claims_with_verdicts(tmp_path):
    runs = tmp_path / "runs"
    sweep(runs, {"parade": [80, 82, 81, 79, 83], "lora": [60, 61, 62, 59, 60], "ia3": [95, 96, 94, 95, 97],
                 "bitfit": [80, 81, 82, 80, 82], "zero_shot": [40]}, majority=50.0)
    sweep(runs, {"parade": [50, 51, 49, 50, 50], "lora": [50, 49, 51, 50, 50]}, task="rte", majority=52.0)
    bench = tmp_path / "bench"
    bench.mkdir()
    rows = [{"method": m, "path": path, "step_x_lora": x, "samples": [{}, {}, {}], "step_spread_pct": spread}
            for m, path, x, spread in [("lora", "new-fp32", 1.0, 5.0), ("parade", "new-fp32", 0.83, 4.0),
                                       ("lora", "new-bf16", 1.0, 8.0), ("parade", "new-bf16", 0.95, 3.0)]]
    (bench / "train-x.json").write_text(json.dumps({"rows": rows}))
    assert report_main([str(runs), "--out", str(tmp_path / "out"), "--reference", "parade", "--claims", str(bench)]) == 0
    out = tmp_path / "out"
    paired = (out / "median-paired.md").read_text()
    lora = next(line for line in paired.splitlines() if line.startswith("| parade − lora |"))
    assert lora.split(" | ")[2].startswith("+20.0 [") and lora.endswith("(n=5) |")       # columns: rte, sst2
    claims = {(c["claim"], c["task"]): c for c in csv_rows(out / "median-claims.csv")}
    assert claims[("PARADE >= lora (Table 1)", "sst2")]["verdict"] == HOLDS
    assert claims[("PARADE >= ia3 (Table 1)", "sst2")]["verdict"] == FAILS
    assert claims[("PARADE >= bitfit (Table 1)", "sst2")]["verdict"] == UNDECIDED
    rte = claims[("PARADE >= lora (Table 1)", "rte")]
    assert rte["verdict"] == UNDECIDED and "beats the floor (52.0)" in rte["reason"]
    assert claims[("PARADE >= lora (Table 1)", "sst2")]["paper"].startswith("94.2 vs 93.6 (+0.6)")
    speed = [c for c in csv_rows(out / "median-claims.csv") if c["task"] == "train-x"]
    assert [c["verdict"] for c in speed] == [HOLDS, UNDECIDED]             # 0.95x is within LoRA's 8% spread
    assert "within the spread" in speed[1]["reason"]
    assert claims[("PARADE >= ptuning_v2 (Table 1)", "sst2")]["reason"] == "no finished run of ptuning_v2 on sst2"
    for ext in ("md", "csv", "tex"):
        assert (out / f"median-intervals.{ext}").is_file() and (out / f"median-paired.{ext}").is_file()
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert report_main([str(runs), "--out", str(out), "--reference", "parade", "--claims", str(bench)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first            # regenerates byte-identical


def test_claims_say_when_a_cell_is_under_the_floor_and_never_decide_on_fewer_than_five_seeds(tmp_path):
    sweep(tmp_path, {"parade": [80, 82, 81, 79, 83], "lora": [45, 46, 44, 45, 46]}, majority=50.0)
    sweep(tmp_path, {"parade": [80, 82, 81], "ia3": [60, 61, 62], "lora": [60, 61, 62]}, task="rte", majority=50.0)
    (tmp_path / "smollm2_135m/ia3/rte/seed1/predictions.jsonl").unlink()
    write_run(tmp_path, "parade", 3, 50, task="rte", extra={"score": float("nan")})    # a seed without a score
    write_run(tmp_path, "zero_shot", 0, 40, task="copa")                   # a task nothing was tuned on: no claims
    with pytest.warns(UserWarning, match=r"ia3/rte/seed1/predictions.jsonl: missing"):
        assert report_main([str(tmp_path), "--out", str(tmp_path / "out"), "--reference", "parade",
                            "--claims", str(tmp_path / "nowhere")]) == 2          # a --claims folder that is not there
        assert report_main([str(tmp_path), "--out", str(tmp_path / "out"), "--reference", "parade",
                            "--claims", str(tmp_path / "smollm2_135m")]) == 0     # a folder without benchmarks
    claims = {(c["claim"], c["task"]): c for c in csv_rows(tmp_path / "out/median-claims.csv")}
    assert {task for _, task in claims} == {"sst2", "rte"}
    sst2 = claims[("PARADE >= lora (Table 1)", "sst2")]
    assert sst2["verdict"] == HOLDS and sst2["reason"].endswith("; lora does not beat the floor (50.0)")
    rte = claims[("PARADE >= ia3 (Table 1)", "rte")]
    assert rte["verdict"] == UNDECIDED and "3 shared seeds of the 5" in rte["reason"] and rte["ours"].endswith("†")
    rte = claims[("PARADE >= lora (Table 1)", "rte")]                 # per-example scores, still 3 seeds: no verdict
    assert rte["verdict"] == UNDECIDED and "3 shared seeds of the 5" in rte["reason"] and "†" not in rte["ours"]
    md = (tmp_path / "out/median-claims.md").read_text()
    assert "1 score claim(s) reached the interval test, each at 95%" in md and "about 0.1 of them" in md
    intervals = (tmp_path / "out/median-intervals.md").read_text()
    parade = next(line for line in intervals.splitlines() if line.startswith("| parade |"))
    assert "nan" not in parade and parade.split(" | ")[2].endswith("(n=3)")     # rte (after copa): NaN seed left out


def test_notes_and_cuts_name_their_task_unless_they_hold_for_every_task(tmp_path):
    write_run(tmp_path, "lora", 0, 60, cuts=["run length: 40 steps", "decoding: greedy"],
              extra={"notes": ["test capped to 300 of 872", "fp32"]})
    write_run(tmp_path, "lora", 0, 60, task="rte", cuts=["run length: 8 steps", "decoding: greedy"],
              extra={"notes": ["test capped to 100 of 277", "fp32"]})
    lines = write_tables([tmp_path], tmp_path / "median")["md"].read_text().splitlines()
    for line in ["- Cut: sst2: run length: 40 steps", "- Cut: rte: run length: 8 steps", "- Cut: decoding: greedy",
                 "- sst2: test capped to 300 of 872", "- rte: test capped to 100 of 277", "- fp32"]:
        assert line in lines


def test_a_caption_names_the_cells_whose_answers_name_no_label(tmp_path):
    write_run(tmp_path, "lora", 0, 70)
    prose = write_run(tmp_path, "zero_shot", 0, 0) / "predictions.jsonl"
    rows = [json.loads(line) for line in prose.read_text().splitlines()]
    prose.write_text("".join(json.dumps({**r, "prediction": "The sentiment of the review"}) + "\n" for r in rows))
    md = write_tables([tmp_path], tmp_path / "median")["md"].read_text()
    line = next(line for line in md.splitlines() if "name no label word" in line)
    assert line.endswith(": zero_shot on sst2 100%.") and "lora" not in line


def test_a_predictions_file_rewritten_between_two_reports_is_read_again(tmp_path):
    write_run(tmp_path, "lora", 0, 70)
    prose = write_run(tmp_path, "zero_shot", 0, 0) / "predictions.jsonl"
    assert "name no label word" not in write_tables([tmp_path], tmp_path / "first")["md"].read_text()
    rows = [json.loads(line) for line in prose.read_text().splitlines()]
    prose.write_text("".join(json.dumps({**r, "prediction": "The sentiment of the review"}) + "\n" for r in rows))
    assert ": zero_shot on sst2 100%." in write_tables([tmp_path], tmp_path / "second")["md"].read_text()


def test_unknown_reference_is_an_error(tmp_path, capsys):
    sweep(tmp_path, {"lora": [60, 61]})
    assert report_main([str(tmp_path), "--reference", "parade"]) == 1
    assert "no run of method 'parade'" in capsys.readouterr().err


def test_cuts_from_the_experiment_config_reach_the_caption(tmp_path):
    write_run(tmp_path, "lora", 0, 60, cuts=["48 steps instead of 10 epochs"])
    assert "- Cut: 48 steps instead of 10 epochs" in write_tables([tmp_path], tmp_path / "t")["md"].read_text()


REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p for p in (REPO / "results").glob("*/median.md") if "Regenerate: " in p.read_text())


def no_plots(text: str) -> str:
    return text.replace(" --plots", "").replace(" -{}-plots", "")        # the flag as Markdown and as LaTeX shows it


def regenerated_differences(table: Path, root: Path, scratch: Path) -> list[str]:
    """Rerun the command in `table`'s notes from `root` into `scratch`; the names of the table files
    (md, csv, tex) whose bytes differ from those beside `table`, once the output folder is swapped back."""
    line = next(n for n in table.read_text().splitlines() if n.startswith("- Regenerate: "))
    argv = shlex.split(line.removeprefix("- Regenerate: "))[3:]            # after `python -m papeft.report`
    out_at = argv.index("--out") + 1
    committed_out, argv[out_at] = argv[out_at], str(scratch)
    argv = [a for a in argv if a != "--plots"]                           # figures: pixels, not bytes
    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert report_main(argv) == 0
    finally:
        os.chdir(cwd)
    differ = []
    for path in sorted(p for p in scratch.iterdir() if p.suffix in (".md", ".csv", ".tex")):
        again = path.read_text().replace(str(scratch), committed_out)
        again = again.replace(str(scratch).replace("_", r"\_"), committed_out.replace("_", r"\_"))
        committed = (table.parent / path.name).read_text()
        if no_plots(again) != no_plots(committed):
            differ.append(path.name)
    return differ


def test_a_table_regenerates_byte_identical_from_the_command_in_its_notes(tmp_path, monkeypatch):
    project = tmp_path / "project"
    sweep(project / "runs", {"parade": [80, 82, 81], "lora": [70, 71, 72], "zero_shot": [40]})
    monkeypatch.chdir(project)
    assert report_main(["runs", "--out", "tables", "--paper", "table1", "--reference", "parade",
                        "--claims", "runs", "--plots"]) == 0
    table = project / "tables/median.md"
    assert "- Regenerate: python -m papeft.report runs --out tables --paper table1 --reference parade " \
           "--claims runs --plots" in table.read_text()                    # relative paths: any checkout
    assert regenerated_differences(table, project, tmp_path / "again") == []
    with (project / "tables/median-paired.md").open("a") as f:
        f.write("edited by hand\n")
    assert regenerated_differences(table, project, tmp_path / "again2") == ["median-paired.md"]


@pytest.mark.parametrize("table", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_tables_regenerate_byte_identical_from_their_runs(table, tmp_path):
    """The command in a committed table's notes, rerun into a scratch folder, gives the same bytes."""
    assert regenerated_differences(table, REPO, tmp_path) == []


def test_selection_picks_the_lowest_dev_loss_never_the_test_score(tmp_path, capsys):
    # lr 1e-3: lower dev loss but lower test score; the record must choose it anyway
    write_run(tmp_path / "lr0.001", "lora", 0, 60, lr=1e-3, dev_loss=0.30)
    write_run(tmp_path / "lr0.003", "lora", 0, 90, lr=3e-3, dev_loss=0.40)
    write_run(tmp_path / "lr0.0003", "lora", 0, 70, lr=3e-4, dev_loss=float("nan"))
    assert selection_main([str(tmp_path), "--out", str(tmp_path / "sel")]) == 0
    rows = (tmp_path / "sel" / "selection.csv").read_text().splitlines()
    chosen = [r for r in rows if r.split(",")[7] == "yes"]
    assert len(chosen) == 1 and chosen[0].split(",")[3] == "0.001"
    assert (tmp_path / "sel" / "dev_curves.png").stat().st_size > 0


def test_selection_flags_an_edge_prints_the_rates_and_adopts_the_chosen_runs(tmp_path, capsys):
    sel, table = tmp_path / "sel", tmp_path / "table"
    write_run(sel / "lr0.001", "lora", 0, 60, lr=1e-3, dev_loss=0.30)     # interior: 1e-3 of 3e-4..3e-3
    write_run(sel / "lr0.003", "lora", 0, 90, lr=3e-3, dev_loss=0.40)
    write_run(sel / "lr0.0003", "lora", 0, 70, lr=3e-4, dev_loss=0.35)
    write_run(sel / "lr0.001", "ia3", 0, 60, lr=1e-3, dev_loss=0.50)      # edge: 1e-2, the highest tried
    write_run(sel / "lr0.003", "ia3", 0, 70, lr=3e-3, dev_loss=0.30)
    ia3 = write_run(sel / "lr0.01", "ia3", 0, 80, lr=1e-2, dev_loss=0.20)
    (ia3 / "checkpoint").mkdir()
    (ia3 / "cell.lock").write_text("{}")
    kept = write_run(table, "lora", 0, 50, lr=1e-3, dev_loss=0.9)           # finished in the table already
    before = (kept / "metrics.json").read_text()
    assert selection_main([str(sel), "--out", str(sel), "--adopt-into", str(table)]) == 0
    out = capsys.readouterr().out
    assert "- ia3 on sst2 (smollm2_135m): 0.01 at the grid's edge: try 0.03" in out and "lora on sst2 (" not in out
    assert "chosen on sst2: lrs: {ia3: 1.0e-02, lora: 1.0e-03}" in out
    adopted = table / "smollm2_135m/ia3/sst2/seed0"
    assert f"adopted {ia3} -> {adopted}" in out and f"kept {kept}" in out
    assert (adopted / "metrics.json").read_text() == (ia3 / "metrics.json").read_text()
    assert sorted(p.name for p in adopted.iterdir()) == ["config.yaml", "metrics.json", "predictions.jsonl"]
    assert (kept / "metrics.json").read_text() == before


def test_selection_lists_a_failed_rate_with_its_reason_and_counts_it_as_tried(tmp_path, capsys):
    write_run(tmp_path / "lr0.001", "para", 0, 60, lr=1e-3, dev_loss=0.50)
    write_run(tmp_path / "lr0.003", "para", 0, 80, lr=3e-3, dev_loss=0.20)    # best finished: 3e-3, the edge of those
    failed = tmp_path / "lr0.01" / "smollm2_135m/para/sst2/seed0"
    failed.mkdir(parents=True)
    (failed / "config.yaml").write_text(OmegaConf.to_yaml({"trainer": {"lr": 1e-2}}))
    (failed / "failed.json").write_text(json.dumps({
        "backbone": "smollm2_135m", "method": "para", "task": "sst2", "seed": 0, "status": "failed",
        "error": "non-finite gradient norm (inf) at step 19: training stopped; lower trainer.lr",
        "error_type": "NonFiniteLossError", "traceback": "..."}))
    pedro = tmp_path / "lr0.001" / "smollm2_135m/pedro/sst2/seed0"                # its only rate failed
    pedro.mkdir(parents=True)
    (pedro / "config.yaml").write_text(OmegaConf.to_yaml({"trainer": {"lr": 1e-3}}))
    (pedro / "failed.json").write_text(json.dumps({
        "backbone": "smollm2_135m", "method": "pedro", "task": "sst2", "seed": 0, "status": "failed",
        "error": "NaN | loss\nat step 7: stopped", "error_type": "NonFiniteLossError", "traceback": "..."}))
    assert selection_main([str(tmp_path), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "selection.md").read_text()
    assert "| para | sst2 | 0.01 | failed: non-finite gradient norm (inf) at step 19 |" in md
    assert "grid's edge" not in md                                       # 1e-2 was tried: 3e-3 is interior
    rows = csv_rows(tmp_path / "selection.csv")
    assert [(r["lr"], r["chosen"], r["failed"]) for r in rows if r["method"] == "para"] == [
        ("0.001", "", ""), ("0.003", "yes", ""), ("0.01", "", "non-finite gradient norm (inf) at step 19")]
    assert "| pedro | sst2 | 0.001 | failed: NaN | loss at step 7 |" not in md          # a pipe would split the cell
    assert "| pedro | sst2 | 0.001 | failed: NaN / loss at step 7 |" in md
    assert "- pedro on sst2 (smollm2_135m): no rate reached a finite dev loss; nothing chosen" in md


def test_selection_without_runs_says_so(tmp_path, capsys):
    assert selection_main([str(tmp_path)]) == 1
    assert "no finished or failed run" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["not json", json.dumps({"uid": "x", "prediction": "positive", "answers": ["negative"]})])
def test_predictions_that_disagree_with_the_score_fall_back_to_seed_resampling(tmp_path, bad):
    for seed, acc in enumerate([80, 82]):
        run = write_run(tmp_path, "parade", seed, acc)
    (run / "predictions.jsonl").write_text(bad + "\n")
    from papeft.report.reproduction import group_runs
    from papeft.report.tables import collect
    with pytest.warns(UserWarning, match="predictions.jsonl"):
        runs = group_runs(collect(tmp_path))[("smollm2_135m", "parade", "sst2")]
    assert runs[1][1] is None and not cell_interval([runs[0][0], runs[1][0]], [runs[0][1], runs[1][1]]).examples
