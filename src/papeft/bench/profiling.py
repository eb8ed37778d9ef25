"""Where the time goes: self time per op of several workloads side by side (torch.profiler), for the
benchmarks' `--profile` (scripts/bench_multitenant.py, scripts/bench_serving.py)."""
from __future__ import annotations

from typing import Callable


def op_profile(workloads: dict[str, Callable[[], object]], title: str, cuda: bool = False, rounds: int = 3,
               top: int = 20) -> str:
    """Self CPU (or device) ms per op of each workload, the least of `rounds` interleaved calls (host
    noise is additive), the ops with the most time in any workload first, and each op's call count."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    times: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for run in workloads.values():
        run()                                                            # warm
    for _ in range(rounds):
        for name, run in workloads.items():
            with profile(activities=acts) as prof:
                run()
            for ev in prof.key_averages():
                ms = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / 1e3
                mine = times.setdefault(ev.key, {})
                mine[name] = min(ms, mine.get(name, ms))
                counts.setdefault(ev.key, {})[name] = ev.count
    names = list(workloads)
    lines = [f"# profile: {title}; self {'device' if cuda else 'CPU'} ms per call, least of {rounds} interleaved "
             "calls (op calls per call)", f"{'op':<52}" + "".join(f"{m:>24}" for m in names)]
    for k in sorted(times, key=lambda k: -max(times[k].values()))[:top]:
        lines.append(f"{k[:51]:<52}" + "".join(f"{times[k].get(m, 0):>15.1f} ({counts[k].get(m, 0):>6})"
                                                 for m in names))
    lines.append(f"{'total':<52}" + "".join(f"{sum(t.get(m, 0) for t in times.values()):>24.1f}" for m in names))
    return "\n".join(lines)
