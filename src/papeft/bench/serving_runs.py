"""The serving benchmark's runs (scripts/bench_serving.py): kept as they finish, and judged against
issue 15's targets.

`RunStore` keeps every finished rate of a setting (all servers' runs at that rate, interleaved)
in `<stem>.progress-<key>.json`, rewritten atomically after each one. `<key>` hashes every
argument that shapes the measurements and the machine, so the same command on the same machine
resumes where a stopped benchmark (a session's end, a kill) left off, and any other starts afresh.
Each run keeps the sampled answers to compare with the offline engine once the servers are gone.

`targets`: PARADE's sustained rate >= 0.95x the bare backbone's and >= 1.2x gathered LoRA's,
PARADE's p99 <= gathered LoRA's at every rate both sustain, no request lost or answered wrongly.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from papeft.bench.load import Outcome, slo_ms, sustained
from papeft.io import write_json


class RunStore:
    """The finished (setting, rate) groups of one benchmark: their rows, answer samples and the rate grid."""

    def __init__(self, stem: Path, key: dict, commit: str | None = None):
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
        self.path = stem.with_name(f"{stem.name}.progress-{digest}.json")
        self.key = key
        self.commit = commit or "unknown"              # the code the servers of this process run
        self.rates: list[float] | None = None
        self.probed: float | None = None
        self.rows: list[dict] = []
        self.samples: list[list[dict]] = []          # per row: the answers to check, as (tenant, prompt, tokens)
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            self.rates, self.probed, self.rows, self.samples = (saved["rates"], saved["probed"], saved["rows"],
                                                                 saved["samples"])

    def has(self, tenants: int, popularity: str, rate: float) -> bool:
        return any((r["tenants"], r["popularity"], r["offered_rps"]) == (tenants, popularity, rate) for r in self.rows)

    def set_rates(self, rates: list[float], probed: float | None) -> None:
        self.rates, self.probed = rates, probed
        self.save()

    def add(self, rows: list[dict], outcomes: list[list[Outcome]], check: int, seed: int) -> None:
        """One rate of one setting, every server's run: its rows and a seeded sample of each run's answers."""
        for row, runs in zip(rows, outcomes):
            answered = [o for o in runs if o.ok]
            pick = random.Random(seed + len(self.rows)).sample(answered, min(check, len(answered)))
            self.rows.append({**row, "commit": self.commit})
            self.samples.append([{"tenant": o.arrival.tenant, "prompt": list(o.arrival.prompt), "tokens": o.tokens}
                                 for o in pick])
        self.save()

    def save(self) -> None:
        write_json(self.path, {"key": self.key, "rates": self.rates, "probed": self.probed, "rows": self.rows,
                               "samples": self.samples})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def ratio_verdict(p: float, q: float, top: float, bound: float, what: str) -> str:
    """PARADE's sustained rate p against another's q: a rate at the top of the grid is only a lower bound."""
    if not q:
        return f"n/a   {what}: the other server sustained no rate tried (a lower one is needed)"
    ratio, head = p / q, f"{what}: {p / q:.3f}x (target >= {bound})"
    if p == top and q == top:
        return f"n/a   {what}: both sustained the highest rate tried ({top:g} req/s): extend --rates"
    if p == top:                                                       # a lower bound
        return f"PASS  {head}, at least" if ratio >= bound else f"n/a   {head} or more: extend --rates"
    if q == top and ratio >= bound:                                    # an upper bound
        return f"n/a   {head} or less: extend --rates"
    return f"{'PASS' if ratio >= bound else 'MISS'}  {head}"


def targets(rows: list[dict], at: tuple[int, str]) -> list[str]:
    """The issue's targets at (tenants, popularity): PASS / MISS with the measured ratio, n/a when the
    runs cannot decide it (a rate at the top of the grid is a lower bound, no rate both sustain)."""
    mine = [r for r in rows if (r["tenants"], r["popularity"]) == at]
    slo = slo_ms(mine)
    if slo != slo:
        return [f"n/a   {at[0]} tenants {at[1]}: no latency objective (nothing answered at the lowest rate)"]
    top = max(r["offered_rps"] for r in mine)
    rate = {s: sustained([r for r in mine if r["server"] == s], slo) for s in {r["server"] for r in mine}}
    out = [f"sustained rate (req/s, {at[0]} tenants {at[1]}, p99 objective {slo:.0f} ms): " + ", ".join(
        f"{s} {v:g}" + (" (the highest tried)" if v == top else "") for s, v in sorted(rate.items()))]
    p = rate.get("parade")
    for other, bound in (("bare", 0.95), ("lora_gathered", 1.2)):
        if p is not None and other in rate:
            out.append(ratio_verdict(p, rate[other], top, bound, f"PARADE sustained rate vs {other}"))
    if "parade" in rate and "lora_gathered" in rate:
        both = min(rate["parade"], rate["lora_gathered"])
        worse = [(r["offered_rps"], r["e2e_p99_ms"], g["e2e_p99_ms"]) for r in mine if r["server"] == "parade"
                 for g in mine if g["server"] == "lora_gathered" and g["offered_rps"] == r["offered_rps"]
                 and r["offered_rps"] <= both and r["e2e_p99_ms"] > g["e2e_p99_ms"]]
        what = "PARADE p99 latency <= gathered LoRA's at every rate both sustain"
        out.append(f"n/a   {what}: there is no such rate" if not both else
                   f"{'PASS' if not worse else 'MISS'}  {what} (<= {both:g} req/s)"
                   + "".join(f"; at {r:g}: {a:.0f} vs {b:.0f} ms" for r, a, b in worse))
    lost = sum(r["requests"] - r["answered"] for r in mine)
    wrong = sum(r["mismatched"] for r in mine)
    out.append(f"{'PASS' if not lost and not wrong else 'MISS'}  no request lost or answered wrongly: {lost} "
               f"unanswered of {sum(r['requests'] for r in mine)}, {wrong} of {sum(r['checked'] for r in mine)} "
               "checked answers differ from the offline engine")
    return out
