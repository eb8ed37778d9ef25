"""The load benchmark's parts: seeded traces, replay against a served endpoint, the sustained-rate rule
and the targets (scripts/bench_serving.py)."""
import json

import numpy as np
import pytest

from papeft.bench.load import make_trace, popularity, run_replay, slo_ms, summarise, sustained
from papeft.bench.serving_runs import ratio_verdict, targets
from papeft.serving import MultiTenantEngine, Request
from papeft.serving.api import make_app
from papeft.serving.continuous import ContinuousBatcher
from conftest import float64, load_script
from test_engine import adapter, backbone, prompts
from test_serving_api import char_tokenizer, serving

EXAMPLES = [(p, 3 + k % 4) for k, p in enumerate(prompts(10, seed=2))]


def test_traces_are_seeded_and_rates_only_compress_time():
    slow, fast = (make_trace(EXAMPLES, 200, rate, 8, "zipf", seed=1) for rate in (1.0, 4.0))
    assert [(a.tenant, a.prompt) for a in slow] == [(a.tenant, a.prompt) for a in fast]
    assert np.allclose([a.at for a in slow], [4 * a.at for a in fast])
    assert slow == make_trace(EXAMPLES, 200, 1.0, 8, "zipf", seed=1) != make_trace(EXAMPLES, 200, 1.0, 8, "zipf", 2)
    assert 150 < slow[-1].at < 250                                   # ~n / rate
    counts = np.bincount([a.tenant for a in make_trace(EXAMPLES, 4000, 1.0, 8, "zipf")], minlength=8)
    assert counts[0] > 2.5 * counts[3] and np.allclose(counts / 4000, popularity(8, "zipf"), atol=0.03)
    assert popularity(4, "uniform").tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="popularity 'pareto'"):
        popularity(4, "pareto")


def row(rate, p99, answered=10):
    return {"offered_rps": rate, "requests": 10, "answered": answered, "e2e_p99_ms": p99}


def test_sustained_rate_stops_where_p99_misses_the_objective_or_a_request_is_lost():
    assert sustained([row(1, 100), row(2, 150), row(4, 300), row(8, 3000)], slo=300) == 4     # 300 is within
    assert sustained([row(1, 100), row(2, 150), row(4, 100), row(8, 900)], slo=300) == 6     # log 100..900: half
    assert sustained([row(2, 150), row(4, 290), row(8, 5000, answered=9)], slo=300) == 4      # lost: no crossing
    assert sustained([row(1, 100), row(2, 150, answered=9), row(4, 120)], slo=300) == 1
    assert sustained([row(1, 100, answered=0)], slo=300) == 0 == sustained([row(1, 400)], slo=300)
    rows = [{"server": "parade", **row(1, 90)}, {"server": "bare", **row(2, 70)}, {"server": "bare", **row(1, 80)}]
    assert slo_ms(rows) == 240                               # the bare backbone's lowest rate, for every server
    assert slo_ms([r for r in rows if r["server"] == "parade"]) == 270


def test_targets_compare_parade_with_bare_and_gathered_lora():
    rows = [{"tenants": 64, "popularity": "zipf", "server": s, **row(r, p), "checked": 2, "mismatched": 0}
            for s, curve in {"bare": [100, 100, 900], "parade": [100, 100, 8100],
                             "lora_gathered": [100, 900, 900]}.items() for r, p in zip((1, 2, 4), curve)]
    lines = targets(rows, (64, "zipf"))                              # objective 300 ms: bare 3, PARADE 2.5, LoRA 1.5
    assert "MISS  PARADE sustained rate vs bare: 0.833x" in lines[1]
    assert "PASS  PARADE sustained rate vs lora_gathered: 1.667x" in lines[2]
    rows[5]["e2e_p99_ms"] = 900                                      # PARADE crosses where bare does
    lines = targets(rows, (64, "zipf"))
    assert "PASS  PARADE sustained rate vs bare: 1.000x" in lines[1]
    assert "PASS  PARADE sustained rate vs lora_gathered: 2.000x" in lines[2]
    assert lines[3].startswith("PASS") and lines[4].startswith("PASS")
    rows[3]["e2e_p99_ms"] = 150                                      # PARADE's p99 150 vs LoRA's 100 at 1 req/s
    assert targets(rows, (64, "zipf"))[3].startswith("MISS  PARADE p99 latency")
    rows[0]["mismatched"] = 1
    assert targets(rows, (64, "zipf"))[-1].startswith("MISS  no request lost or answered wrongly")
    for r in rows:                                                   # nobody saturated: nothing to decide
        r["e2e_p99_ms"] = 100
    lines = targets(rows, (64, "zipf"))
    assert all(line.startswith("n/a") for line in lines[1:3]) and "extend --rates" in lines[1]
    assert ratio_verdict(4, 2, top=4, bound=1.2, what="x").startswith("PASS  x: 2.000x (target >= 1.2), at least")
    assert ratio_verdict(2, 4, top=4, bound=0.95, what="x").startswith("MISS")


def test_replay_against_the_endpoint_answers_every_request_as_the_offline_engine(tmp_path):
    with float64():
        engine = MultiTenantEngine(backbone())
        for k in range(3):
            engine.add_tenant(f"t{k}", adapter(tmp_path, "parade", seed=k)[0])
        app = make_app(ContinuousBatcher(engine, max_rows=4), char_tokenizer(), "tiny")
        trace = make_trace(EXAMPLES, 12, 20.0, 3, "zipf", seed=3)
        with serving(app) as url:
            outcomes, wall = run_replay(url, trace, lambda k: f"t{k}", drain_s=60)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    for o in outcomes:
        assert 0 < o.ttft_s <= o.e2e_s < wall
        n = o.arrival.answer_tokens
        ref = engine.generate([Request(list(o.arrival.prompt), f"t{o.arrival.tenant}")], max_new_tokens=n,
                              min_new_tokens=n)[0]
        assert o.tokens == ref.tokens
    s = summarise(outcomes, 20.0)
    assert s["answered"] == 12 and s["tok_s"] > 0 and s["e2e_p50_ms"] <= s["e2e_p99_ms"]


def test_the_benchmark_end_to_end_on_a_tiny_backbone_stopped_and_resumed(tmp_path, shared_data, monkeypatch):
    """Two servers as processes on the loopback address, the saturation probe, the rates, the checks, the
    files; stopped after two rates, the same command resumes from there (no probe, no run measured twice)."""
    monkeypatch.setenv("PAPEFT_DATA", str(shared_data))
    bench = load_script("bench_serving")
    replay, calls, stop_at = bench.run_replay, [], [8]    # 2 warm-ups, the probe, 2 rates x 2 servers, stop

    class Stopped(Exception):                          # a session's end, say
        pass

    def counted(url, trace, *rest):
        calls.append(len(trace))
        if len(calls) in stop_at:
            raise Stopped
        return replay(url, trace, *rest)
    monkeypatch.setattr(bench, "run_replay", counted)
    argv = ["--backbone", "tiny_llama", "--servers", "bare,parade", "--settings", "2:zipf", "--tenants", "2",
            "--requests", "3", "--probe-requests", "5", "--max-answer", "4", "--warmup", "1", "--check", "2",
            "--out", str(tmp_path)]
    with pytest.raises(Stopped):
        bench.main(argv)
    progress, = tmp_path.glob("serving-tiny_llama-cpu.progress-*.json")
    kept = json.loads(progress.read_text())
    assert len(kept["rows"]) == 4 and len(kept["rates"]) == 8
    assert not (tmp_path / "serving-tiny_llama-cpu.json").exists()
    calls.clear(), stop_at.clear()
    assert bench.main(argv) == 0
    assert calls == [1, 1] + [3] * 12                 # warm-ups, then only the 6 rates left, both servers each
    saved = json.loads((tmp_path / "serving-tiny_llama-cpu.json").read_text())
    assert {r["server"] for r in saved["rows"]} == {"bare", "parade"} and len(saved["rows"]) == 2 * 8
    assert saved["rows"][:4] == [{**r, "checked": 2} for r in kept["rows"]]
    assert sorted({r["offered_rps"] for r in saved["rows"]}) == kept["rates"]
    assert all(r["answered"] == r["requests"] == 3 and r["mismatched"] == 0 and r["checked"] == 2
               for r in saved["rows"])
    assert "saturated throughput" in saved["header"] and saved["targets"][-1].startswith("PASS  no request lost")
    assert (tmp_path / "serving-tiny_llama-cpu.png").stat().st_size > 0 and not progress.exists()
