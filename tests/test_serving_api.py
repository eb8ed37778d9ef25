"""The OpenAI-compatible endpoint, started on the loopback address and queried with a real HTTP client
(httpx): answers equal the offline engine's, streaming equals the whole answer, errors carry a 4xx and the
reason, the queue is bounded, tenants come and go while it serves."""
import asyncio
import concurrent.futures
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from papeft.bench.load import free_port
from papeft.serving import MultiTenantEngine, Request
from papeft.serving.api import Reply, make_app
from papeft.serving.continuous import ContinuousBatcher
from papeft.tasks.prompting import PromptFormatter
from conftest import REPO, VOCAB, float64
from test_engine import TENANTS, adapter, backbone, prompts

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One id per printable character (3..96 for the tiny models' 97), <pad>/<s>/</s> = 0/1/2, a chat template."""
    chars = [chr(c) for c in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT)


@contextlib.contextmanager
def serving(app: web.Application):
    """`app` served on 127.0.0.1 (a free port) from a thread of its own; yields the base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app, handler_cancellation=True)
    asyncio.run_coroutine_threadsafe(runner.setup(), loop).result()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    asyncio.run_coroutine_threadsafe(site.start(), loop).result()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, engine, tenants directory): tiny Llama in float64 with every servable method."""
    root = tmp_path_factory.mktemp("tenants")
    with float64():
        engine = MultiTenantEngine(backbone())
        for k, (name, method) in enumerate(TENANTS.items()):
            d = adapter(root, method, seed=10 + k)[0]
            engine.add_tenant(name, d.rename(root / name))
        app = make_app(ContinuousBatcher(engine, max_rows=6, max_prefill_rows=3), char_tokenizer(), "tiny",
                       tenants_dir=root, max_new_tokens=12, max_prompt_tokens=40)
        with serving(app) as url:
            yield url, engine, root


def waiting_reaches(url: str, n: int, seconds: float = 10.0) -> bool:
    """Whether the server's queue holds exactly `n` requests within `seconds` (polled)."""
    end = time.time() + seconds
    while time.time() < end:
        if httpx.get(f"{url}/health", timeout=5).json()["waiting"] == n:
            return True
        time.sleep(0.02)
    return False


def offline(engine, ids, tenant, new, beams=1, min_new=None):
    return engine.generate([Request(ids, tenant)], max_new_tokens=new, num_beams=beams, min_new_tokens=min_new)[0]


async def _many(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


def test_concurrent_completions_equal_the_offline_engine(server):
    url, engine, _ = server
    names = list(TENANTS) + ["tiny"]
    bodies = [{"model": n, "prompt": p, "max_tokens": 4 + k % 5, "return_token_ids": True,
               **({"num_beams": 2} if k % 4 == 3 else {})}
              for k, (n, p) in enumerate(zip(names * 2, prompts(2 * len(names), seed=21)))]
    for body, resp in zip(bodies, asyncio.run(_many(url, bodies))):
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        tenant = None if body["model"] == "tiny" else body["model"]
        expected = offline(engine, body["prompt"], tenant, body["max_tokens"], body.get("num_beams", 1)).tokens
        assert choice["token_ids"] == expected, body
        assert choice["text"] == char_tokenizer().decode(expected, skip_special_tokens=True)
        assert resp.json()["usage"]["completion_tokens"] == len(expected)


def test_chat_streaming_equals_the_whole_answer(server):
    url, engine, _ = server
    body = {"model": "parade", "messages": [{"role": "user", "content": "Is it good?"}], "max_tokens": 10,
            "min_tokens": 10}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    text = whole["choices"][0]["message"]["content"]
    ids = PromptFormatter(char_tokenizer()).encode_prompt(body["messages"])   # the tenants' training template
    assert char_tokenizer().decode(ids) == "<user>Is it good?<a>"
    assert text == char_tokenizer().decode(offline(engine, ids, "parade", 10, min_new=10).tokens,
                                           skip_special_tokens=True)
    pieces, done = [], False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                pieces.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
    assert done and len(pieces) > 2 and "".join(pieces) == text


@pytest.mark.parametrize("body,status,says", [
    ({"model": "nobody", "prompt": "hi"}, 404, "unknown tenant 'nobody'"),
    ({"model": "parade", "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' is 0; expected an integer in 1..12"),
    ({"model": "parade", "prompt": "hi", "temperature": 0.7}, 400, "'temperature'"),
    ({"model": "parade", "prompt": "hi", "n": 2}, 400, "'n'"),
    ({"model": "parade", "prompt": "hi", "stop": ["."]}, 400, "'stop' is not supported"),
    ({"model": "parade", "prompt": ""}, 400, "'prompt' must be a non-empty string"),
    ({"model": "parade", "prompt": "x" * 41}, 413, "at most 40"),
    ({"model": "parade", "prompt": "hi", "num_beams": 2, "stream": True}, 400, "beam search answers at the end"),
    ({"prompt": "hi"}, 400, "'model' must name a tenant"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests_get_a_4xx_with_the_reason(server, body, status, says):
    url = server[0]
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status and says in r.json()["error"]["message"], r.text
    assert httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30).status_code == 400
    big = httpx.post(f"{url}/v1/completions", content=b" " * ((1 << 20) + 1), timeout=30)
    assert big.status_code == 413 and "1048576 bytes" in big.json()["error"]["message"]


def test_a_chat_its_template_refuses_is_a_bad_request_and_any_end_token_stops():
    tok = char_tokenizer()
    tok.chat_template = "{% if messages|length > 1 %}{{ raise_exception('roles must alternate') }}{% endif %}" + CHAT
    with float64():
        engine = MultiTenantEngine(backbone())
        turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with serving(make_app(ContinuousBatcher(engine), tok, "tiny")) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": turns}, timeout=30)
        broken = char_tokenizer()
        broken.chat_template = "{{ messages | no_such_filter }}"         # the server's own bug, not the client's
        with serving(make_app(ContinuousBatcher(engine), broken, "tiny")) as url:
            bug = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": turns[:1]}, timeout=30)
    assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"], r.text
    assert bug.status_code == 500
    reply = Reply(False, "tiny", 3, tok, True, eos={2, 7})
    assert reply.finish_reason([5, 7], 2) == "stop" and reply.finish_reason([5, 6], 2) == "length"
    assert reply.finish_reason([7], 2) == "stop" and reply.finish_reason([5], 2) == "stop"


def test_out_of_vocabulary_token_ids_are_refused(server):
    r = httpx.post(f"{server[0]}/v1/completions", json={"model": "lora", "prompt": [5, VOCAB + 3]}, timeout=30)
    assert r.status_code == 400 and "token ids must lie in [0, 97)" in r.json()["error"]["message"]


def test_a_full_queue_answers_429_and_the_waiting_request_is_served_after():
    with float64():
        batcher = ContinuousBatcher(MultiTenantEngine(backbone()), max_waiting=1)
        app = make_app(batcher, char_tokenizer(), "tiny")
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        batcher.lock.acquire()                               # no iteration can run: the first request waits
        try:
            first = pool.submit(client.post, "/v1/completions", json={"model": "tiny", "prompt": [5, 6],
                                                                      "max_tokens": 3})
            assert waiting_reaches(url, 1)
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1" and "max_waiting=1" in r.text
        finally:
            batcher.lock.release()
        assert first.result().status_code == 200


def test_a_client_that_disconnects_takes_its_request_out_of_the_queue():
    with float64():
        batcher = ContinuousBatcher(MultiTenantEngine(backbone()), max_waiting=4)
        app = make_app(batcher, char_tokenizer(), "tiny")
    with serving(app) as url:
        batcher.lock.acquire()                               # the request can only wait
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                gone = pool.submit(httpx.post, f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 6]},
                                   timeout=1.5)
                assert waiting_reaches(url, 1)                      # it was queued
                with pytest.raises(httpx.ReadTimeout):
                    gone.result()
            assert waiting_reaches(url, 0)                          # gone before any iteration ran
        finally:
            batcher.lock.release()


def test_a_stream_whose_tenant_goes_before_it_starts_gets_a_404():
    with float64(), tempfile.TemporaryDirectory() as tmp:
        engine = MultiTenantEngine(backbone())
        engine.add_tenant("brief", adapter(Path(tmp), "parade", seed=4)[0])
        batcher = ContinuousBatcher(engine)
        app = make_app(batcher, char_tokenizer(), "tiny")
        with serving(app) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
            batcher.lock.acquire()                           # queued, not started
            try:
                reply = pool.submit(httpx.post, f"{url}/v1/completions", timeout=30,
                                    json={"model": "brief", "prompt": [5, 6], "stream": True})
                assert waiting_reaches(url, 1)
                batcher.remove_tenant("brief")               # the lock is reentrant: same thread
            finally:
                batcher.lock.release()
            r = reply.result()
    assert r.status_code == 404 and "removed" in r.json()["error"]["message"]


def test_tenants_added_and_removed_over_http(server):
    url, engine, root = server
    d = adapter(root, "ia3", seed=77)[0]
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.post("/v1/tenants", json={"name": "late", "path": d.name}).status_code == 201
        assert "late" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        r = client.post("/v1/completions", json={"model": "late", "prompt": [5, 6, 7], "max_tokens": 5,
                                                 "return_token_ids": True})
        assert r.json()["choices"][0]["token_ids"] == offline(engine, [5, 6, 7], "late", 5).tokens
        outside = client.post("/v1/tenants", json={"name": "evil", "path": "../../etc"})
        assert outside.status_code == 400 and "under the tenants directory" in outside.text
        broken = root / "broken"
        shutil.copytree(d, broken)
        (broken / "adapter.safetensors").write_bytes(b"garbage")
        r = client.post("/v1/tenants", json={"name": "broken", "path": "broken"})
        assert r.status_code == 400 and "corrupt or unreadable" in r.text
        assert "broken" in client.get("/v1/tenants").json()["refused"]
        assert client.delete("/v1/tenants/late").status_code == 200
        assert client.post("/v1/completions", json={"model": "late", "prompt": "hi"}).status_code == 404
        assert client.delete("/v1/tenants/late").status_code == 404


def test_the_command_line_serves_a_tenants_directory(tmp_path):
    """`python -m papeft.serving` on the tiny random Llama config (the real tokenizer): it loads every
    adapter directory, refuses a corrupt one with the reason, and answers on the loopback address."""
    from papeft.backbone.loading import backbone_config, load_backbone
    from papeft.methods import build_method
    model, tok = load_backbone(backbone_config("tiny_llama"))
    build_method(model, {"type": "parade", "r": 4}).save_adapter(tmp_path / "acme")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter_config.json").write_text("{")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "papeft.serving", "--backbone", "tiny_llama", "--tenants",
                             str(tmp_path), "--port", str(port)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        listed = httpx.get(f"{url}/v1/tenants").json()
        assert list(listed["tenants"]) == ["acme"] and "no readable adapter_config.json" in listed["refused"]["junk"]
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"model": "acme", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(timeout=60)
