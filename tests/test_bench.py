"""The Table 4 benchmark script end to end on a tiny random model: every method, tables, targets."""
import csv
import json

import pytest
import torch

from conftest import REPO, load_script
from papeft.bench.tables import COLUMNS, rerender
from papeft.serving.memory import TensorPeak


def test_benchmark_writes_tables_for_every_method(tmp_path, capsys):
    bench = load_script("bench_multitenant")
    assert bench.main(["--random-config", "tiny_llama", "--batch-sizes", "8", "--tenants", "8", "--beams", "1,3",
                       "--new-tokens", "3", "--prompt-tokens", "20", "--repeats", "2", "--warmup", "0",
                       "--out", str(tmp_path), "--profile", "parade,lora_gathered"]) == 0
    stem = tmp_path / "multitenant-tiny_llama-cpu-float32"
    rows = list(csv.DictReader(stem.with_suffix(".csv").open()))
    methods = ["bare", "parade", "para", "pedro", "ia3", "lora_peft", "lora_gathered", "lopa"]
    assert [r["method"] for r in rows] == methods * 2 and {r["beams"] for r in rows} == {"1", "3"}
    for r in rows:
        assert float(r["prefill_ms"]) > 0 and float(r["decode_tok_s"]) > 0
        assert float(r["tensor_peak_mib"]) > 0                      # traced at the target cell (8, 8)
        if r["method"] == "bare":
            assert float(r["decode_x_bare"]) == 1.0 and float(r["prefill_x_bare"]) == 1.0
    by = {(r["beams"], r["method"]): r for r in rows}
    # resident weights: the peft engine holds its own backbone copy, tenants add their adapters
    assert float(by["1", "lora_peft"]["tensor_peak_mib"]) > float(by["1", "bare"]["tensor_peak_mib"])
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert len(saved["targets"]) == 2 * 7 and all(t.split()[0] in ("PASS", "MISS") for t in saved["targets"])
    tex = stem.with_suffix(".tex").read_text()
    assert "\\begin{tabular}" in tex and tex.count("\\\\") == 1 + len(rows)
    assert "wrote" in capsys.readouterr().out
    prof = (tmp_path / "multitenant-tiny_llama-cpu-float32-profile.txt").read_text().splitlines()
    assert prof[0].startswith("# made by `python scripts/bench_multitenant.py --random-config tiny_llama")
    assert prof[2].split() == ["op", "parade", "lora_gathered"] and prof[-1].startswith("total")
    assert any(line.startswith("aten::bmm") for line in prof)          # gathered LoRA's batched matmuls


def test_benchmark_rejects_unknown_method():
    with pytest.raises(SystemExit):
        load_script("bench_multitenant").parse_args(["--methods", "parade,dora"])


def test_tensor_peak_counts_what_a_call_allocates():
    keep = torch.zeros(1000)
    with TensorPeak([keep]) as tracker:
        a = torch.ones(256)                   # 1 KiB alive
        b = torch.ones(512)                   # 2 KiB alive at once
        del a, b
        c = torch.ones(128)                   # after both freed: the peak stays 3 KiB
    assert tracker.peak == (256 + 512) * 4 and c.numel() == 128


SAVED_RUNS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "results/bench").rglob("*.json"))


@pytest.mark.parametrize("saved", SAVED_RUNS)
def test_committed_tables_rerender_byte_identical(saved, tmp_path):
    """Every committed benchmark run's md/csv/tex comes back byte for byte from its json."""
    saved = REPO / saved
    columns = load_script("bench_train").COLUMNS if saved.name.startswith("train-") else COLUMNS
    paths = rerender(saved, columns, stem=tmp_path / saved.stem)
    for ext, path in paths.items():
        assert path.read_bytes() == saved.with_suffix(f".{ext}").read_bytes(), ext
