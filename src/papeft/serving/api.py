"""An OpenAI-compatible endpoint over the iteration-level batcher (aiohttp): one frozen backbone, each
tenant named by the request's `model`.

    POST /v1/completions        {"model", "prompt": text | [token ids], "max_tokens", "stream", ...}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...}  (the tenants' training template)
    GET  /v1/models             the bare backbone (its config name) and every tenant
    GET  /v1/tenants            tenants with their methods, and the refused ones with why
    POST /v1/tenants            {"name", "path"}: load an adapter from under the tenants directory
    DELETE /v1/tenants/{name}   running requests finish, new ones get 404
    GET  /health                waiting / running jobs

Decoding is greedy, or beam search with the extension `"num_beams": k` (answered at the
end, never streamed); `"min_tokens"` forces at least that many new tokens (the load
benchmark's fixed answer lengths); `"return_token_ids": true` adds each choice's token ids.
Sampling is not offered: `temperature` > 0 or `top_p` < 1 is refused with the reason, as are
`n` > 1, `stop`, `logprobs` and `echo`.

Errors (OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`): 400 for a bad
body (the field and what was expected), 404 for an unknown or removed tenant, 413 for a
body or prompt over the limits, 429 with Retry-After when `max_waiting` jobs already wait
(a bounded queue: memory never grows with the offered load), 503 while shutting down.
A client that disconnects cancels its job; its rows leave the batch at the next step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from aiohttp import web
from jinja2 import TemplateError, TemplateSyntaxError, UndefinedError

from papeft.serving.continuous import ContinuousBatcher, Job, QueueFull, Stopped
from papeft.serving.engine import Request
from papeft.serving.tenants import TenantError
from papeft.tasks.prompting import PromptFormatter

BATCHER, SETTINGS = web.AppKey("batcher", ContinuousBatcher), web.AppKey("settings", dict)
UNSUPPORTED = {"stop": None, "logprobs": None, "echo": False, "suffix": None, "tools": None, "functions": None,
               "logit_bias": None, "seed": None, "frequency_penalty": 0, "presence_penalty": 0, "best_of": 1,
               "top_logprobs": None}


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}},
                             status=status, headers=headers)


# ---- request bodies ------------------------------------------------------------
def _field(body: dict, key: str, kind, default, check=None, expected: str = ""):
    value = body.get(key, default)
    if value is None:
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or \
            kind is not int and not isinstance(value, kind) or (check is not None and not check(value)):
        raise BadRequest(400, f"'{key}' is {json.dumps(value)[:80]}; expected {expected}", key)
    return value


def decoding(body: dict, settings: dict) -> dict:
    """Job settings from the body; BadRequest naming the field for anything not served."""
    cap = settings["max_new_tokens"]
    max_tokens = _field(body, "max_tokens", int, min(16, cap), lambda v: 1 <= v <= cap, f"an integer in 1..{cap}")
    max_tokens = _field(body, "max_completion_tokens", int, max_tokens, lambda v: 1 <= v <= cap,
                        f"an integer in 1..{cap}")
    beams = _field(body, "num_beams", int, 1, lambda v: 1 <= v <= settings["max_beams"],
                   f"an integer in 1..{settings['max_beams']}")
    min_tokens = _field(body, "min_tokens", int, 0, lambda v: 0 <= v <= max_tokens, f"an integer in 0..{max_tokens}")
    _field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")
    _field(body, "temperature", (int, float), 0, lambda v: v == 0, "0: decoding is greedy or beam search")
    _field(body, "top_p", (int, float), 1, lambda v: v == 1, "1: decoding is greedy or beam search")
    stream = _field(body, "stream", bool, False, expected="true or false")
    if stream and beams > 1:
        raise BadRequest(400, "'stream' with 'num_beams' > 1: beam search answers at the end", "stream")
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, None, [], False):
            raise BadRequest(400, f"'{key}' is not supported by this server", key)
    if body.get("response_format") not in (None, {"type": "text"}):
        raise BadRequest(400, "'response_format' other than text is not supported by this server", "response_format")
    return dict(max_new_tokens=max_tokens, num_beams=beams, min_new_tokens=min_tokens or None, stream=stream,
                token_ids=_field(body, "return_token_ids", bool, False, expected="true or false"))


def prompt_ids(body: dict, chat: bool, settings: dict) -> list[int]:
    tok = settings["tokenizer"]
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in msgs):
            raise BadRequest(400, "'messages' must be a non-empty list of {'role': system | user | assistant, "
                                  "'content': text}", "messages")
        system = "\n".join(m["content"] for m in msgs if m["role"] == "system") or settings["system_prompt"]
        turns = [m for m in msgs if m["role"] != "system"]
        try:
            ids = PromptFormatter(tok, settings["chat_template"], system).encode_prompt(turns)
        except (ValueError, TemplateError) as e:                 # e.g. a template that wants alternating roles
            if isinstance(e, (TemplateSyntaxError, UndefinedError)):  # the template's own bug: the server's
                raise
            raise BadRequest(400, f"'messages': {e}", "messages") from e
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = prompt
            if not all(0 <= t < settings["vocab"] for t in ids):
                raise BadRequest(400, f"'prompt' token ids must lie in [0, {settings['vocab']})", "prompt")
        else:
            raise BadRequest(400, "'prompt' must be a non-empty string or a non-empty list of token ids "
                                  "(one prompt per request)", "prompt")
    if len(ids) > settings["max_prompt_tokens"]:
        raise BadRequest(413, f"the prompt has {len(ids)} tokens; at most {settings['max_prompt_tokens']}", "prompt")
    return ids


def tenant_of(body: dict, batcher: ContinuousBatcher, settings: dict) -> str | None:
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest(400, "'model' must name a tenant (GET /v1/models lists them)", "model")
    if model == settings["backbone_name"]:
        return None
    engine = batcher.engine
    if model not in engine.tenants or model in batcher.removing:
        why = engine.refused.get(model)
        raise BadRequest(404, f"tenant '{model}' was refused: {why}" if why else
                         f"unknown tenant '{model}'; GET /v1/models lists the served ones", "model")
    return model


# ---- handlers --------------------------------------------------------------------
async def completions(request: web.Request, chat: bool = False) -> web.StreamResponse:
    app = request.app
    batcher, settings = app[BATCHER], app[SETTINGS]
    if settings["closing"] or not batcher.alive:
        return error(503, "the server is shutting down" if settings["closing"] else "the batcher is not running")
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"the body is larger than the {settings['max_body_bytes']} bytes this server accepts")
    except (ValueError, UnicodeDecodeError) as e:
        return error(400, f"the body is not JSON: {e}")
    try:
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        tenant = tenant_of(body, batcher, settings)
        params = decoding(body, settings)
        ids = prompt_ids(body, chat, settings)
    except BadRequest as e:
        return error(e.status, e.message, e.param)
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    done = loop.create_future()
    job = Job(Request(ids, tenant), max_new_tokens=params["max_new_tokens"], num_beams=params["num_beams"],
              min_new_tokens=params["min_new_tokens"],
              on_tokens=(lambda t: loop.call_soon_threadsafe(tokens.put_nowait, list(t))) if params["stream"] else None,
              on_done=lambda j: loop.call_soon_threadsafe(_resolve, done, j))
    try:
        batcher.submit(job)
    except QueueFull as e:
        return error(429, f"too many requests waiting: {e}")
    except Stopped as e:
        return error(503, str(e))
    except ValueError as e:
        return error(404 if "removed" in str(e) else 400, str(e))
    reply = Reply(chat, body["model"], len(ids), settings["tokenizer"], params["token_ids"], set(batcher.engine.eos))
    try:
        if params["stream"]:
            return await reply.stream(request, tokens, done)
        await done
    except (asyncio.CancelledError, ConnectionResetError):
        batcher.cancel(job)                                # out of the queue now, or its rows leave at the next step
        raise
    result = job.result
    if not result.ok:
        return error(job.status, result.error, "model" if job.status == 404 else None)
    return web.json_response(reply.whole(result.tokens, params["max_new_tokens"]))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await completions(request, chat=True)


def _resolve(future: asyncio.Future, job: Job) -> None:
    if not future.done():
        future.set_result(job)


class Reply:
    """The response bodies of one request: whole, or streamed as server-sent events."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, tokenizer, token_ids: bool, eos: set[int]):
        self.chat, self.model, self.prompt_tokens, self.tok, self.token_ids = chat, model, prompt_tokens, \
            tokenizer, token_ids
        self.eos = eos                                  # every end token of the model (the engine's)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, choice: dict, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def _choice(self, text: str, finish: str | None, tokens: list[int] | None, chunk: bool = False) -> dict:
        choice = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["delta" if chunk else "message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        if self.token_ids and tokens is not None:
            choice["token_ids"] = tokens
        return choice

    def finish_reason(self, tokens: list[int], max_new: int) -> str:
        """OpenAI's: "length" when the budget ran out before an end token, else "stop"."""
        return "length" if len(tokens) >= max_new and not (tokens and tokens[-1] in self.eos) else "stop"

    def text(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True)

    def whole(self, tokens: list[int], max_new: int) -> dict:
        finish = self.finish_reason(tokens, max_new)
        body = self._envelope(self._choice(self.text(tokens), finish, tokens))
        body["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(tokens),
                         "total_tokens": self.prompt_tokens + len(tokens)}
        return body

    async def stream(self, request: web.Request, tokens: asyncio.Queue, done: asyncio.Future) -> web.StreamResponse:
        """Server-sent events: one chunk per new piece of text, then the finish reason and [DONE]. The
        headers wait for the first tokens, so a request that fails before any gets its own status."""
        first = await self._next(tokens, done)
        if first is None and not done.result().result.ok:
            job = done.result()
            return error(job.status, job.result.error, "model" if job.status == 404 else None)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sent, said, pending = [], "", []                   # pending: ids whose text is not out yet
        new = first
        while new is not None:
            sent += new
            pending += new
            text = self.text(sent)
            if not text.endswith("\ufffd"):                    # a character cut in the middle waits for the rest
                await self._event(resp, self._choice(text[len(said):], None, pending, chunk=True))
                said, pending = text, []
            new = await self._next(tokens, done)
        job = done.result()
        if job.result.ok:
            finish = self.finish_reason(job.result.tokens, job.max_new_tokens)
            await self._event(resp, self._choice(self.text(job.result.tokens)[len(said):], finish, pending,
                                                 chunk=True))
        else:
            await resp.write(f"data: {json.dumps({'error': {'message': job.result.error}})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @staticmethod
    async def _next(tokens: asyncio.Queue, done: asyncio.Future) -> list[int] | None:
        """The next tokens, or None once the job is done and every token has been taken."""
        getter = asyncio.ensure_future(tokens.get())
        try:
            await asyncio.wait([getter, done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()                            # an item it was woken for stays in the queue
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None if tokens.empty() else tokens.get_nowait()

    async def _event(self, resp: web.StreamResponse, choice: dict) -> None:
        await resp.write(f"data: {json.dumps(self._envelope(choice, chunk=True))}\n\n".encode())


async def models(request: web.Request) -> web.Response:
    batcher, settings = request.app[BATCHER], request.app[SETTINGS]
    loaded = dict(batcher.engine.tenants)                  # a snapshot: tenants may be added meanwhile
    names = [settings["backbone_name"]] + sorted(n for n in loaded if n not in batcher.removing)
    return web.json_response({"object": "list", "data": [
        {"id": n, "object": "model", "owned_by": "papeft",
         "method": loaded[n].method if n in loaded else "backbone"} for n in names]})


async def tenants(request: web.Request) -> web.Response:
    engine = request.app[BATCHER].engine
    loaded, refused = dict(engine.tenants), dict(engine.refused)          # snapshots
    return web.json_response({"tenants": {n: {"method": t.method, "directory": str(t.directory)}
                                          for n, t in sorted(loaded.items())},
                              "refused": dict(sorted(refused.items()))})


async def add_tenant(request: web.Request) -> web.Response:
    batcher, settings = request.app[BATCHER], request.app[SETTINGS]
    try:
        body = await request.json()
        name, path = body["name"], body["path"]
        if not isinstance(name, str) or not name or name == settings["backbone_name"] or not isinstance(path, str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return error(400, "the body must be {'name': a new tenant name (not the backbone's), "
                          "'path': its adapter directory under the tenants directory}")
    root = settings["tenants_dir"]
    if root is None:
        return error(400, "this server was started without a tenants directory: it cannot load adapters")
    directory = (root / path).resolve()
    if not directory.is_relative_to(root):
        return error(400, f"'path' must lie under the tenants directory {root}", "path")
    loop = asyncio.get_running_loop()
    try:                                                   # loading takes the batcher's lock: off the event loop
        await loop.run_in_executor(None, batcher.add_tenant, name, directory)
    except (TenantError, ValueError) as e:
        return error(400, str(e), "path")
    tenant = batcher.engine.tenants.get(name)              # None if removed meanwhile
    return web.json_response({"name": name, "method": tenant.method if tenant else None}, status=201)


async def remove_tenant(request: web.Request) -> web.Response:
    batcher, name = request.app[BATCHER], request.match_info["name"]
    try:
        await asyncio.get_running_loop().run_in_executor(None, batcher.remove_tenant, name)
    except KeyError:
        return error(404, f"tenant '{name}' is not loaded")
    return web.json_response({"name": name, "removed": True})


async def health(request: web.Request) -> web.Response:
    b = request.app[BATCHER]
    return web.json_response({"status": "ok", "waiting": len(b.waiting), "running": len(b.running),
                              "iterations": b.iterations})


def make_app(batcher: ContinuousBatcher, tokenizer, backbone_name: str, tenants_dir: str | Path | None = None,
             chat_template: str = "auto", system_prompt: str | None = None, max_new_tokens: int = 512,
             max_prompt_tokens: int = 2048, max_beams: int = 4, max_body_bytes: int = 1 << 20) -> web.Application:
    """The aiohttp application; the batcher's worker thread starts and stops with it. Run it with
    `handler_cancellation=True` (as `python -m papeft.serving` does): a client that disconnects then cancels
    its request, streamed or not; aiohttp's default keeps computing an abandoned whole answer."""
    app = web.Application(client_max_size=max_body_bytes)
    app[BATCHER] = batcher
    app[SETTINGS] = dict(tokenizer=tokenizer, backbone_name=backbone_name, chat_template=chat_template,
                         system_prompt=system_prompt,
                         tenants_dir=None if tenants_dir is None else Path(tenants_dir).resolve(),
                         max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                         max_beams=min(max_beams, batcher.max_rows), max_body_bytes=max_body_bytes, closing=False,
                         vocab=batcher.engine.backbone.get_input_embeddings().num_embeddings)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/tenants", tenants)
    app.router.add_post("/v1/tenants", add_tenant)
    app.router.add_delete("/v1/tenants/{name}", remove_tenant)
    app.router.add_get("/health", health)

    async def closing(app):                                # before the handlers are waited for: new ones get 503
        app[SETTINGS]["closing"] = True

    async def lifecycle(app):
        batcher.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)
    app.on_shutdown.append(closing)
    app.cleanup_ctx.append(lifecycle)
    return app
