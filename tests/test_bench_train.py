"""scripts/bench_train.py end to end on a tiny random model: paths interleaved, ratios, tables, targets."""
import csv
import json

import pytest

from conftest import load_script


def test_training_benchmark_writes_tables_with_ratios_and_targets(tmp_path, capsys):
    bench = load_script("bench_train")
    assert bench.main(["--random-config", "tiny_llama", "--seq-len", "16", "--batch-size", "4",
                       "--micro-batch-size", "2", "--methods", "lora,parade,ptuning_v2", "--precisions", "fp32,bf16",
                       "--repeats", "2", "--warmup", "0", "--out", str(tmp_path), "--note", "under test"]) == 0
    stem = tmp_path / "train-tiny_llama-cpu-seq16"
    rows = list(csv.DictReader(stem.with_suffix(".csv").open()))
    assert [(r["method"], r["path"]) for r in rows] == [(m, p) for m in ("lora", "parade", "ptuning_v2")
                                                        for p in ("today", "new-fp32", "new-bf16")]
    for r in rows:
        assert float(r["step_s"]) > 0 and float(r["tok_s"]) > 0 and float(r["peak_mib"]) > 0
        assert int(r["tokens"]) == 4 * 16
        if r["path"] == "today":
            assert float(r["tok_s_x_today"]) == 1.0
        if r["method"] == "lora":
            assert float(r["step_x_lora"]) == 1.0
    by = {(r["method"], r["path"]): r for r in rows}
    # the full-vocabulary logits of today's path are the largest tensors of a tiny model's step
    assert float(by["lora", "new-fp32"]["peak_mib"]) < float(by["lora", "today"]["peak_mib"])
    assert float(by["lora", "new-bf16"]["peak_mib"]) < float(by["lora", "new-fp32"]["peak_mib"])   # bf16 backbone
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert len(saved["targets"]) == 2 * 2 + 3 and all(t.split()[0] in ("PASS", "MISS") for t in saved["targets"])
    assert all(len(r["samples"]) == 2 for r in saved["rows"])
    md = stem.with_suffix(".md").read_text().splitlines()
    assert md[1].startswith("Made by `python scripts/bench_train.py --random-config tiny_llama") and "torch" in md[1]
    assert md[2] == "under test"
    assert "wrote" in capsys.readouterr().out


def test_training_benchmark_rejects_unknown_names():
    bench = load_script("bench_train")
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "lora,dora"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--precisions", "fp8"])


def test_training_benchmark_reads_a_task_as_a_run_composes_it(root, monkeypatch):
    """The step's examples come from the task's composed config (its split settings live in
    task/shared/split.yaml, reached through the file's defaults list), tokenised by the real backbone."""
    from types import SimpleNamespace

    from papeft.paths import composed
    bench = load_script("bench_train")
    task = composed("task", "copa")
    assert "defaults" not in task and task["split_protocol"] == "paper" and task["name"] == "copa"
    monkeypatch.setenv("PAPEFT_DATA", root)
    args = SimpleNamespace(seq_len=None, task="copa", batch_size=3, backbone="smollm2_135m", dtype=None)
    examples = bench.examples_for(args, vocab=49152)
    assert len(examples) == 3 and all(e.prompt and e.response for e in examples)
