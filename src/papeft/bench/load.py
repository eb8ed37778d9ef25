"""A load generator for the served endpoint: a fixed, seeded trace replayed on the loopback address.

A trace is `n` requests with Poisson arrivals at `rate` per second, each for a tenant drawn
from a popularity law over `tenants` (uniform, or Zipf: P(rank k) ~ 1 / k^s) and an example
(prompt ids, answer length) drawn from a task's test set. The unit-rate gaps, tenants and
examples come from one seed, so the traces of one setting at different rates are the same
requests, only closer together; every server replays the same trace.

`replay` sends each request at its time (streamed completions with `min_tokens` =
`max_tokens` = the answer length, so every server generates the same number of tokens),
and records time to first token (the first streamed chunk with tokens: a token that ends
in the middle of a character comes with the next) and end-to-end latency from the moment
it was sent.
Bounded: the trace has `n` requests, and a run ends `drain_s` after the last arrival;
what has not finished by then is counted as timed out.
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

POPULARITY = ("uniform", "zipf")


@dataclass(frozen=True)
class Arrival:
    at: float                      # seconds after the run starts
    tenant: int                    # popularity rank, 0 = most requested
    prompt: tuple[int, ...]
    answer_tokens: int


@dataclass
class Outcome:
    arrival: Arrival
    status: int = 0                # HTTP status; 0: no answer (timed out or connection failed)
    sent: float = float("nan")     # seconds after the run starts
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    tokens: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and len(self.tokens) == self.arrival.answer_tokens


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a server started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def popularity(tenants: int, kind: str, zipf_s: float = 1.0) -> np.ndarray:
    if kind not in POPULARITY:
        raise ValueError(f"popularity '{kind}'; expected one of {POPULARITY}")
    weights = np.ones(tenants) if kind == "uniform" else 1.0 / np.arange(1, tenants + 1) ** zipf_s
    return weights / weights.sum()


def make_trace(examples: list[tuple[list[int], int]], n: int, rate: float, tenants: int, kind: str,
               seed: int = 0, zipf_s: float = 1.0) -> list[Arrival]:
    """`n` arrivals at `rate` per second; `examples` are (prompt ids, answer length) pairs."""
    if n < 1 or rate <= 0 or tenants < 1 or not examples:
        raise ValueError(f"a trace needs n >= 1 ({n}), rate > 0 ({rate}), tenants >= 1 ({tenants}) and examples")
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1.0, n)) / rate
    who = rng.choice(tenants, size=n, p=popularity(tenants, kind, zipf_s))
    pick = rng.integers(len(examples), size=n)
    return [Arrival(float(t), int(k), tuple(examples[e][0]), int(examples[e][1])) for t, k, e in zip(at, who, pick)]


async def _one(session: aiohttp.ClientSession, url: str, model: str, a: Arrival, start: float,
               out: Outcome) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + a.at - loop.time()))
    sent = loop.time()
    out.sent = sent - start
    body = {"model": model, "prompt": list(a.prompt), "max_tokens": a.answer_tokens, "min_tokens": a.answer_tokens,
            "stream": True, "return_token_ids": True}
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = (await resp.text())[:300]
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = event["error"]["message"]
                    continue
                new = event["choices"][0].get("token_ids") or []
                if new and out.ttft_s != out.ttft_s:
                    out.ttft_s = loop.time() - sent
                out.tokens += new
        out.e2e_s = loop.time() - sent
    except (aiohttp.ClientError, ValueError, KeyError, IndexError, TypeError) as e:   # a broken answer: failed
        out.error = f"{type(e).__name__}: {e}"


async def replay(url: str, trace: list[Arrival], model_of, drain_s: float = 60.0) -> list[Outcome]:
    """Send every arrival at its time; `model_of(rank)` names its tenant. Unfinished at the end: status 0."""
    outcomes = [Outcome(a) for a in trace]
    connector = aiohttp.TCPConnector(limit=0)                          # one connection per request in flight
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        start = asyncio.get_running_loop().time() + 0.05
        tasks = [asyncio.ensure_future(_one(session, url, model_of(a.tenant), a, start, o))
                 for a, o in zip(trace, outcomes)]
        _, late = await asyncio.wait(tasks, timeout=trace[-1].at + drain_s + 0.05)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    for o in outcomes:
        if o.e2e_s != o.e2e_s and o.error is None:
            o.status, o.error = 0, "timed out"
    return outcomes


def summarise(outcomes: list[Outcome], rate: float) -> dict:
    """Throughput over the run (first send to last answer), latency percentiles over answered requests;
    `arrival_rps` from the actual send times and `lag_p99_ms` (send time minus trace time): a client that
    falls behind its trace offers less load than it claims."""
    ok = [o for o in outcomes if o.ok]
    first = min((o.sent for o in outcomes if o.sent == o.sent), default=0.0)
    last = max((o.sent + o.e2e_s for o in ok), default=first)
    span = max(last - first, 1e-9)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")     # noqa: E731
    ttft, e2e = [o.ttft_s for o in ok], [o.e2e_s for o in ok]
    sends = [o.sent for o in outcomes if o.sent == o.sent]
    lag = [o.sent - o.arrival.at for o in outcomes if o.sent == o.sent]
    return {"offered_rps": rate, "arrival_rps": (len(sends) - 1) / max(max(sends) - min(sends), 1e-9) if sends
            else float("nan"), "lag_p99_ms": 1e3 * pct(lag, 99),
            "requests": len(outcomes), "answered": len(ok),
            "rejected": sum(o.status in (429, 503) for o in outcomes),
            "timed_out": sum(o.error == "timed out" for o in outcomes),
            "failed": sum(not o.ok and o.status not in (429, 503) and o.error != "timed out" for o in outcomes),
            "req_s": len(ok) / span, "tok_s": sum(len(o.tokens) for o in ok) / span,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "e2e_p50_ms": 1e3 * pct(e2e, 50), "e2e_p99_ms": 1e3 * pct(e2e, 99)}


def slo_ms(rows: list[dict], reference: str = "bare", factor: float = 3.0) -> float:
    """One latency objective for every server of a setting: `factor` x the p99 end-to-end latency of the
    `reference` server (the bare backbone) at the lowest rate, or of the lowest-rate run of any server."""
    ref = [r for r in rows if r.get("server") == reference] or rows
    return factor * min(ref, key=lambda r: r["offered_rps"])["e2e_p99_ms"] if ref else float("nan")


def sustained(rows: list[dict], slo: float) -> float:
    """The highest offered rate one server sustains: every request answered and p99 end-to-end latency
    within `slo` ms (past its capacity a queue builds and latency runs away). Between the last run that
    held and the next, whose p99 missed, the rate where p99 crosses the objective, interpolated on log
    latency (a grid's step is coarser than a 0.95x target); where the next lost requests, the last that
    held. 0.0 when even the lowest rate fails. Three significant digits."""
    best = 0.0
    runs = sorted(rows, key=lambda r: r["offered_rps"])
    for k, r in enumerate(runs):
        if r["answered"] == r["requests"] and r["e2e_p99_ms"] <= slo:
            best = r["offered_rps"]
            continue
        if k and r["answered"] == r["requests"]:                        # held before, p99 over the objective now
            prev = runs[k - 1]
            lo, hi = math.log(prev["e2e_p99_ms"]), math.log(r["e2e_p99_ms"])
            best += (math.log(slo) - lo) / (hi - lo) * (r["offered_rps"] - prev["offered_rps"])
        break
    return float(f"{best:.3g}")


def run_replay(url: str, trace: list[Arrival], model_of, drain_s: float = 60.0) -> tuple[list[Outcome], float]:
    """`replay` from synchronous code; also returns the wall seconds it took."""
    t0 = time.perf_counter()
    outcomes = asyncio.run(replay(url, trace, model_of, drain_s))
    return outcomes, time.perf_counter() - t0
