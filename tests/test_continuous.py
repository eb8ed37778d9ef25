"""Iteration-level batching: a job's tokens equal the offline engine's for the same request alone, whatever
joins or leaves the batch around it; bounded queue; tenants added and removed while jobs run."""
import pytest
import torch

from papeft.serving import MultiTenantEngine, Request, TenantError
from papeft.serving.continuous import ContinuousBatcher, Job, QueueFull, Stopped
from conftest import float64
from test_engine import TENANTS, adapter, backbone, prompts

NEW = 6


@pytest.fixture(scope="module", autouse=True)
def in_float64():
    with float64():
        yield


@pytest.fixture(scope="module", params=["gathered", "peft"])
def engine(request, tmp_path_factory):
    """Tiny Llama with a tenant of every servable method (LoRA through `lora_backend`)."""
    tmp_path = tmp_path_factory.mktemp("tenants")
    engine = MultiTenantEngine(backbone(), lora_backend=request.param)
    for k, (name, method) in enumerate(TENANTS.items()):
        engine.add_tenant(name, adapter(tmp_path, method, seed=10 + k)[0])
    return engine


def offline(engine, req: Request, beams: int, min_new: int | None = None, new: int = NEW):
    return engine.generate([req], max_new_tokens=new, num_beams=beams, min_new_tokens=min_new,
                           return_scores=True)[0]


def staggered(batcher: ContinuousBatcher, jobs: list[Job], every: int, group: int = 1) -> None:
    """Submit `group` jobs every `every` iterations (every=0: all at once), then run until idle. Jobs
    admitted together are prefilled together, left-padded to the longest of them."""
    for k in range(0, len(jobs), group):
        for job in jobs[k: k + group]:
            batcher.submit(job)
        for _ in range(every):
            batcher.step()
    batcher.run_until_idle()


@pytest.mark.parametrize("beams,every", [(1, 0), (1, 2), (3, 1)])
def test_tokens_equal_the_offline_engine_whatever_joins_and_leaves(engine, beams, every):
    names = list(TENANTS) + [None]
    ps = prompts(2 * len(names), seed=beams + every)
    requests = [Request(p, names[k % len(names)]) for k, p in enumerate(ps)]
    # varied lengths: rows leave at different steps while others join
    jobs = [Job(r, max_new_tokens=NEW - k % 3, num_beams=beams, return_scores=True) for k, r in enumerate(requests)]
    batcher = ContinuousBatcher(engine, max_rows=5 * beams, max_prefill_rows=3)
    staggered(batcher, jobs, every)
    assert batcher.batch is None and not batcher.running and batcher.iterations > NEW
    for job in jobs:
        alone = engine.generate([job.request], max_new_tokens=job.max_new_tokens, num_beams=beams,
                                return_scores=True)[0]
        assert job.result.ok, job.result.error
        assert job.result.tokens == alone.tokens, job.request.tenant
        assert job.result.score == pytest.approx(alone.score, rel=1e-6, abs=1e-6), job.request.tenant
    assert not [n for n, m in engine.backbone.named_modules() if "forward" in m.__dict__]


def test_min_new_tokens_streaming_and_timestamps(engine):
    req = Request(prompts(1, seed=7)[0], "parade")
    streamed = []
    job = Job(req, max_new_tokens=NEW, min_new_tokens=NEW, on_tokens=streamed.extend)
    batcher = ContinuousBatcher(engine)
    batcher.submit(job)
    batcher.run_until_idle()
    assert job.result.tokens == offline(engine, req, 1, min_new=NEW).tokens == streamed
    assert len(streamed) == NEW
    assert job.result.score is None                          # greedy scores only on request (a vocabulary softmax)
    assert job.submitted <= job.first_token_at <= job.finished_at


def test_bad_requests_fail_alone_and_the_queue_is_bounded(engine):
    batcher = ContinuousBatcher(engine, max_rows=4, max_waiting=3)
    with pytest.raises(ValueError, match="max_waiting=0"):
        ContinuousBatcher(engine, max_waiting=0)
    good = Job(Request(prompts(1)[0], "lora"), max_new_tokens=NEW)
    bad = [Job(Request([1, 2, 3], "nobody")), Job(Request([], "parade")), Job(Request([10 ** 6], None))]
    for job in [bad[0], good, bad[1]]:
        batcher.submit(job)
    with pytest.raises(QueueFull, match="max_waiting=3"):
        batcher.submit(bad[2])
    with pytest.raises(ValueError, match="num_beams=9"):
        batcher.submit(Job(Request([1, 2]), num_beams=9))
    batcher.run_until_idle()
    assert "unknown tenant 'nobody'" in bad[0].result.error
    assert "non-empty" in bad[1].result.error
    assert good.result.tokens == offline(engine, good.request, 1).tokens


def test_cancelled_jobs_leave_without_disturbing_the_rest(engine):
    batcher = ContinuousBatcher(engine)
    jobs = [Job(Request(p, t), max_new_tokens=NEW) for p, t in zip(prompts(3, seed=3), ["parade", "lora", "ia3"])]
    for job in jobs:
        batcher.submit(job)
    batcher.step()
    rows = len(batcher.batch)
    batcher.cancel(jobs[1])                                  # running: its rows leave at the next step
    batcher.step()
    assert jobs[1].result.error == "cancelled" and jobs[1].status == 499
    assert len(batcher.batch) == rows - 1
    batcher.run_until_idle()
    for job in (jobs[0], jobs[2]):
        assert job.result.tokens == offline(engine, job.request, 1).tokens


def test_tenants_added_and_removed_while_jobs_run(engine, tmp_path):
    batcher = ContinuousBatcher(engine)
    running = Job(Request(prompts(1, seed=5)[0], "lora_b"), max_new_tokens=NEW)
    expected = offline(engine, running.request, 1).tokens
    waiting = Job(Request(prompts(1, seed=6)[0], "lora_b"), max_new_tokens=NEW)
    batcher.submit(running)
    batcher.step()                                           # running is in the batch now
    batcher.submit(waiting)
    batcher.remove_tenant("lora_b")
    assert "removed" in waiting.result.error                 # answered at once, never run
    with pytest.raises(ValueError, match="being removed"):
        batcher.submit(Job(Request([1, 2, 3], "lora_b")))
    d, _ = adapter(tmp_path, "parade", seed=99)
    batcher.add_tenant("fresh", d)                           # joins while lora_b's job still runs
    late = Job(Request(prompts(1, seed=8)[0], "fresh"), max_new_tokens=NEW)
    batcher.submit(late)
    batcher.run_until_idle()
    assert running.result.tokens == expected                 # finished with its weights
    assert "lora_b" not in engine.tenants                    # and then they went
    assert late.result.tokens == offline(engine, late.request, 1).tokens
    engine.remove_tenant("fresh")
    engine.add_tenant("lora_b", adapter(tmp_path, "lora", seed=10 + list(TENANTS).index("lora_b"))[0])
    with pytest.raises(TenantError, match="already loaded"):
        batcher.add_tenant("lora_b", tmp_path / "missing")
    with pytest.raises(TenantError, match="no readable"):
        batcher.add_tenant("ghost", tmp_path / "missing")
    assert "ghost" in engine.refused and "lora_b" not in engine.refused
    del engine.refused["ghost"]


def test_worker_thread_serves_jobs_submitted_from_other_threads(engine):
    batcher = ContinuousBatcher(engine, max_rows=4)
    batcher.start()
    try:
        jobs = [batcher.submit(Job(Request(p, t), max_new_tokens=NEW))
                for p, t in zip(prompts(6, seed=11), ["parade", None, "ia3", "lopa", "pedro", "lora"])]
        assert all(job.wait(timeout=120) for job in jobs)
    finally:
        batcher.stop()
    for job in jobs:
        assert job.result.tokens == offline(engine, job.request, 1).tokens


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_other_architectures_join_mid_decode(tmp_path, arch):
    """gpt2: fused qkv and learned absolute positions (padding must not shift them); gemma: one kv head."""
    engine = MultiTenantEngine(backbone(arch))
    for name, method in [("parade", "parade"), ("lora", "lora"), ("ia3", "ia3")]:
        engine.add_tenant(name, adapter(tmp_path, method, seed=3, arch=arch)[0])
    ps = prompts(8, seed=4)
    jobs = [Job(Request(p, t), max_new_tokens=NEW - k % 3)
            for k, (p, t) in enumerate(zip(ps, ["parade", "lora", None, "ia3"] * 2))]
    assert len({len(p) for p in ps[:3]}) > 1                 # padded prefills
    staggered(ContinuousBatcher(engine, max_rows=5), jobs, every=2, group=3)
    for job in jobs:
        assert job.result.tokens == offline(engine, job.request, 1, new=job.max_new_tokens).tokens, job.request.tenant


def test_a_failing_iteration_answers_its_jobs_and_the_worker_lives_on(engine, monkeypatch):
    batcher = ContinuousBatcher(engine)
    batcher.start()
    try:
        with monkeypatch.context() as m:
            m.setattr(batcher, "_decode", lambda: 1 / 0)
            broken = batcher.submit(Job(Request(prompts(1, seed=9)[0], "parade"), max_new_tokens=NEW))
            assert broken.wait(timeout=60)
        assert broken.status == 500 and "ZeroDivisionError" in broken.result.error
        later = batcher.submit(Job(Request(prompts(1, seed=9)[0], "parade"), max_new_tokens=NEW))
        assert later.wait(timeout=60) and batcher.alive
        assert later.result.tokens == offline(engine, later.request, 1).tokens
    finally:
        batcher.stop()


def test_failures_outside_a_decode_step_never_stop_the_worker(engine, tmp_path, monkeypatch):
    """A tenant whose soft prompt fails: 500, its own; a tenant whose unload fails: refused from then on;
    an iteration failing outside its guard: the jobs in hand answered 500. The worker serves on."""
    engine.add_tenant("sticky", adapter(tmp_path, "ia3", seed=6)[0])
    sticky = engine.tenants["sticky"]
    batcher = ContinuousBatcher(engine)
    batcher.start()
    try:
        with monkeypatch.context() as m:
            m.setattr(engine.banks[engine._bank_of["lopa"]], "prompt_for", lambda *a: 1 / 0)
            soft = batcher.submit(Job(Request(prompts(1)[0], "lopa"), max_new_tokens=NEW))
            assert soft.wait(timeout=60) and soft.status == 500 and "its soft prompt" in soft.result.error
            m.setattr(engine, "remove_tenant", lambda name: 1 / 0)
            batcher.remove_tenant("sticky")
            m.setattr(batcher, "_admit", lambda: 1 / 0)
            lost = batcher.submit(Job(Request(prompts(1)[0], "parade"), max_new_tokens=NEW))
            assert lost.wait(timeout=60) and lost.status == 500 and "internal error" in lost.result.error
        gone = batcher.submit(Job(Request(prompts(1)[0], "sticky"), max_new_tokens=NEW))
        assert gone.wait(timeout=60) and gone.status == 404 and "unloading its weights failed" in gone.result.error
        later = batcher.submit(Job(Request(prompts(1, seed=9)[0], "lopa"), max_new_tokens=NEW))
        assert later.wait(timeout=60) and batcher.alive
        assert later.result.tokens == offline(engine, later.request, 1).tokens
    finally:
        batcher.stop()
        engine.refused.pop("sticky", None)
        engine.tenants["sticky"] = sticky                   # unloaded for good: the engine is the module's
        engine.remove_tenant("sticky")


def test_a_backbone_whose_generation_config_the_decoders_cannot_follow_is_refused():
    m = backbone()
    m.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="repetition_penalty"):
        ContinuousBatcher(MultiTenantEngine(m))


def test_waiting_jobs_with_tensor_prompts_are_answered_on_removal_and_stop(engine, tmp_path):
    """Jobs are compared by identity (their prompts may be tensors); stop() answers every job it holds."""
    engine.add_tenant("doomed", adapter(tmp_path, "ia3", seed=5)[0])
    batcher = ContinuousBatcher(engine)
    jobs = [batcher.submit(Job(Request(torch.tensor(p), t), max_new_tokens=NEW))
            for p, t in zip(prompts(3, seed=12), [None, "doomed", "parade"])]
    batcher.remove_tenant("doomed")
    assert jobs[1].status == 404 and "removed" in jobs[1].result.error
    batcher.start()
    batcher.stop()                                           # whatever it had not finished is answered
    assert all(j.wait(timeout=0) for j in jobs)
    assert {j.status for j in (jobs[0], jobs[2])} <= {200, 503}
    with pytest.raises(Stopped):
        batcher.submit(Job(Request([1, 2, 3])))
