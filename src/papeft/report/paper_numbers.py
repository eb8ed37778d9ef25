"""The PARADE paper's own numbers (METHODS.md section 5: LLaMA-2 7B unless stated, median of 5 seeds),
keyed by our method and task names, for `python -m papeft.report <dir> --paper table1`.

Scores are the papers' main metric per task: accuracy (SST-2, RTE, QNLI, BoolQ, COPA), mean of F1
and EM (ReCoRD, SQuAD), ROUGE-L (E2E), final-answer accuracy (GSM8K), execution accuracy (WikiSQL),
the judge's 1-10 score (MT-Bench; its ROUGE-L is in `extra`). Table 4 (generation speed) is not a
score table: its tokens/s are in `SPEED_TABLE4` for the benchmark script to print beside its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PaperRow:
    method: str                       # our method name (configs/method/<name>.yaml)
    label: str                        # as the paper prints it
    params: str                       # the paper's tunable-parameter column
    scores: dict[str, float]          # task -> score
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PaperTable:
    name: str
    backbone: str                     # our backbone name
    source: str                       # where the numbers come from
    tasks: tuple[str, ...]            # the paper's column order
    rows: tuple[PaperRow, ...]

    def row(self, method: str) -> PaperRow | None:
        return next((r for r in self.rows if r.method == method), None)


def _rows(tasks: tuple[str, ...], spec: list[tuple[str, str, str, tuple[float, ...]]]) -> tuple[PaperRow, ...]:
    return tuple(PaperRow(m, label, params, dict(zip(tasks, scores))) for m, label, params, scores in spec)


T1 = ("sst2", "rte", "qnli", "boolq", "copa", "record", "squad")
T2 = ("e2e", "gsm8k", "wikisql")
T6 = ("boolq", "e2e", "squad")

TABLES: dict[str, PaperTable] = {t.name: t for t in (
    PaperTable("table1", "llama2_7b", "PARADE Table 1, LLaMA-2 7B, median of 5 seeds", T1, _rows(T1, [
        ("lora", "LoRA", "10.0M", (93.6, 82.6, 92.5, 86.7, 90.7, 90.2, 87.7)),
        ("adalora", "AdaLoRA", "10.0M", (93.6, 82.9, 92.6, 86.6, 90.8, 90.5, 87.5)),
        ("bitfit", "BitFit", "10.9M", (92.9, 81.9, 92.2, 85.6, 90.5, 89.8, 87.2)),
        ("ia3", "(IA)3", "9.8M", (93.0, 82.7, 92.5, 86.4, 90.7, 90.1, 87.6)),
        ("houlsby", "Houlsby", "9.4M", (92.9, 80.6, 92.4, 84.5, 90.4, 89.8, 87.3)),
        ("parallel", "Parallel", "9.4M", (93.0, 80.5, 92.5, 85.1, 90.2, 90.1, 87.7)),
        ("ptuning_v2", "P-tuning v2", "9.4M", (92.8, 80.6, 92.1, 85.2, 90.1, 89.4, 86.9)),
        ("parade", "PARADE", "8.9M", (94.2, 83.7, 93.2, 87.4, 91.8, 91.0, 88.3)),
    ])),
    PaperTable("table2", "llama2_7b", "PARADE Table 2, LLaMA-2 7B", T2, _rows(T2, [
        ("ia3", "(IA)3", "9.8M", (70.2, 34.3, 84.2)),
        ("lora", "LoRA", "10.0M", (70.7, 35.1, 85.4)),
        ("adalora", "AdaLoRA", "10.0M", (70.8, 35.2, 85.2)),
        ("parade", "PARADE", "8.9M", (71.4, 36.1, 85.8)),
    ])),
    PaperTable("table3", "llama2_7b", "PARADE Table 3, Alpaca -> MT-Bench, judge score (ROUGE-L in extra)",
               ("alpaca_mtbench",), (
        PaperRow("adalora", "AdaLoRA", "10.0M", {"alpaca_mtbench": 7.01}, {"rouge_l": 51.1}),
        PaperRow("parade", "PARADE", "8.9M", {"alpaca_mtbench": 7.23}, {"rouge_l": 52.6}),
    )),
    PaperTable("table6", "llama2_7b", "PARADE Table 6 (ablations), LLaMA-2 7B", T6, _rows(T6, [
        ("parade", "PARADE", "8.9M", (87.4, 71.4, 88.3)),
        ("parade_1", "PARADE-1", "", (86.6, 70.8, 87.8)),
        ("parade_2", "PARADE-2", "", (86.3, 70.4, 87.6)),
        ("parade_3", "PARADE-3", "9.8M", (87.1, 71.0, 88.1)),
        ("parade_4", "PARADE-4", "9.4M", (86.5, 70.3, 87.5)),
    ])),
    PaperTable("table7_gpt2_large", "gpt2_large", "PARADE Table 7, GPT-2 large", T6, _rows(T6, [
        ("parade", "PARADE", "", (68.1, 66.9, 44.3)),
        ("lora", "LoRA", "", (67.5, 66.6, 43.8)),
    ])),
    PaperTable("table7_pythia_1_4b", "pythia_1_4b", "PARADE Table 7, Pythia-1.4B", T6, _rows(T6, [
        ("parade", "PARADE", "", (72.2, 68.9, 51.1)),
        ("lora", "LoRA", "", (71.6, 68.4, 50.4)),
    ])),
)}

# PARADE Table 4: tokens/s generating 32 new tokens after a 274-token prompt, LoRA unmerged.
SPEED_TABLE4: dict[str, dict[str, float]] = {
    "lora": {"beam1": 25.1, "beam3": 21.9},
    "ia3": {"beam1": 33.1, "beam3": 27.6},
    "parade": {"beam1": 32.5, "beam3": 27.3},
}


def get_table(name: str) -> PaperTable:
    """A paper table by name (`table7` alone means GPT-2 large's half)."""
    key = {"table7": "table7_gpt2_large"}.get(name, name)
    if key not in TABLES:
        raise KeyError(f"no paper numbers for {name!r}; known: {', '.join(sorted(TABLES))}")
    return TABLES[key]
