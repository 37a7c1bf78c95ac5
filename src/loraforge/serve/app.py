"""The Starlette app of `loraforge serve` (server.py's docstring describes the API), in named pieces:

- `ServerState`: what every handler needs (registry, batching worker, grammar cache, context limit, key);
- `guarded`: the one API-key check, wrapped around every route but /health;
- the route handlers (`models`, `health`, `chat_completions`, `completions`, `load_adapter`,
  `unload_adapter`); generation goes through `Submission` (a Job handed to the worker, its event queue
  and the watcher that cancels it when the client goes away) and `Reply` (OpenAI's response shapes);
- `EXCEPTION_HANDLERS`: error type -> HTTP status and OpenAI error body, the only place that picks one.

Imported by server.build_app once starlette (the optional `serve` extra) is known to be installed.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from loraforge.serve.batching import BatchWorker
from loraforge.serve.decoding import Job
from loraforge.serve.errors import AdapterAlreadyLoaded, AdapterLoadFailed, AdapterNotFound, BadRequest, Unauthorized
from loraforge.serve.parsing import Grammars, Parsed, context_limit, json_body, parse_request
from loraforge.serve.registry import Registry


class ServerState:
    """One server's model, worker and settings; `app.state.server` (handlers reach it via `state(request)`)."""

    def __init__(self, registry: Registry, *, api_key: str | None, max_batch: int, wait_ms: float,
                 max_context: int | None):
        self.registry = registry
        self.api_key = api_key
        self.limit = context_limit(registry.model, max_context)
        self.worker = BatchWorker(registry, max_batch=max_batch, wait_ms=wait_ms)
        self.grammars = Grammars(registry.tokenizer, sorted(self.worker.stops))
        self.created = int(time.time())

    def authorised(self, request) -> bool:
        given = request.headers.get("authorization", "").encode()
        return not self.api_key or hmac.compare_digest(given, f"Bearer {self.api_key}".encode())


def state(request) -> ServerState:
    return request.app.state.server


def guarded(handler):
    """The route's handler behind the API key: a request without `Authorization: Bearer KEY` is a 401."""
    @functools.wraps(handler)
    async def check(request):
        if not state(request).authorised(request):
            raise Unauthorized()
        return await handler(request)
    return check


# ---- errors: one table from type to response --------------------------------------------------------

def error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    """OpenAI's error shape {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class GenerationFailed(Exception):
    """The worker failed a request (its message is the worker's)."""


async def _not_found(request, exc):
    return error(getattr(exc, "status_code", 404), f"{request.method} {request.url.path}: "
                 f"{getattr(exc, 'detail', 'not found')}")


def _answer(status: int, *, type_: str = "invalid_request_error", param: str | None = None,
            code: str | None = None, message: str | None = None):
    """An exception handler that answers `status` with the error's text (or `message`)."""
    async def handler(request, exc):
        return error(status, message or str(exc), type_=type_, param=param, code=code)
    return handler


async def _bad_request(request, exc: BadRequest):
    return error(exc.status, exc.message, param=exc.param, code=exc.code)


EXCEPTION_HANDLERS = {  # the most specific class wins (Starlette looks the exception's classes up in order)
    BadRequest: _bad_request,
    Unauthorized: _answer(401, type_="authentication_error", code="invalid_api_key",
                          message="missing or wrong API key"),
    AdapterAlreadyLoaded: _answer(409, param="path", code="adapter_load_failed"),
    AdapterLoadFailed: _answer(400, param="path", code="adapter_load_failed"),
    AdapterNotFound: _answer(404, param="name", code="model_not_found"),
    GenerationFailed: _answer(500, type_="server_error"),
    404: _not_found,
    405: _not_found,
}


# ---- generation -------------------------------------------------------------------------------------

async def _cancel_on_disconnect(request, job) -> None:
    """Wait for the client to go away, then cancel its job (the worker drops its row at the next step)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            return


class Submission:
    """A parsed request running on the worker: its Job, the queue of (delta, finish) events the worker
    thread sends, and the watcher that cancels the job when the client goes away. `close()` always runs."""

    def __init__(self, request, parsed: Parsed, grammar, worker: BatchWorker):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

        def emit(delta, finish):  # called on the worker thread
            loop.call_soon_threadsafe(self.events.put_nowait, (delta, finish))

        self.job = Job(parsed.prompt_ids, parsed.adapter, parsed.max_tokens, emit, sampling=parsed.sampling)
        if grammar is not None:
            self.job.grammar = grammar.start()
        worker.submit(self.job)
        self.watcher = asyncio.create_task(_cancel_on_disconnect(request, self.job))

    async def next(self) -> tuple[str | None, str | None]:
        return await self.events.get()

    def close(self) -> None:
        self.job.cancelled.set()  # a no-op when it finished; otherwise the worker drops its row
        self.watcher.cancel()


class Reply:
    """OpenAI's response shapes for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.object = "chat.completion" if chat else "text_completion"

    def whole(self, text: str, finish: str, job: Job) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": job.completion_tokens,
                 "total_tokens": len(job.prompt_ids) + job.completion_tokens}
        return {"id": self.id, "object": self.object, "created": int(time.time()), "model": self.model,
                "choices": [choice], "usage": usage}

    def chunk(self, delta: dict, finish: str | None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}
        obj = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": int(time.time()),
               "model": self.model, "choices": [choice]}
        return f"data: {json.dumps(obj)}\n\n"


async def _whole_answer(sub: Submission, reply: Reply) -> JSONResponse:
    parts, finish = [], None
    try:
        while finish is None:
            delta, finish = await sub.next()
            if delta:
                parts.append(delta)
    finally:
        sub.close()
    if finish == "error":
        raise GenerationFailed("".join(parts))
    if finish == "adapter_unloaded":
        raise BadRequest(404, f"the adapter '{reply.model}' was unloaded", param="model", code="model_not_found")
    return JSONResponse(reply.whole("".join(parts), finish, sub.job))


async def _event_stream(sub: Submission, reply: Reply):
    """Server-sent events: a role chunk, content chunks, a finish chunk and [DONE] (or one error event)."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""}, None)
        while True:
            delta, finish = await sub.next()
            if finish in ("error", "adapter_unloaded"):
                msg = delta or f"the adapter '{reply.model}' was unloaded"
                yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
                break
            if delta:
                yield reply.chunk({"content": delta}, None)
            if finish is not None:
                yield reply.chunk({}, finish)
                yield "data: [DONE]\n\n"
                break
    finally:  # also on a client that went away: the worker drops its row
        sub.close()


async def _generate(request, chat: bool):
    st = state(request)
    parsed = parse_request(json_body(await request.body()), chat=chat, registry=st.registry, limit=st.limit)
    grammar = None
    if parsed.structure is not None:  # compiled off the event loop: the first one takes about a second
        grammar = await asyncio.to_thread(st.grammars.compile, parsed.structure)
    reply = Reply(chat, parsed.model)
    sub = Submission(request, parsed, grammar, st.worker)
    if not parsed.stream:
        return await _whole_answer(sub, reply)
    return StreamingResponse(_event_stream(sub, reply), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- routes -----------------------------------------------------------------------------------------

async def chat_completions(request):
    return await _generate(request, chat=True)


async def completions(request):
    return await _generate(request, chat=False)


async def models(request):
    st = state(request)
    reg = st.registry
    return JSONResponse({"object": "list", "data": [
        {"id": n, "object": "model", "created": st.created, "owned_by": "loraforge",
         "root": reg.base_name, "parent": None if n == reg.base_name else reg.base_name}
        for n in reg.names()]})


async def health(request):
    st = state(request)
    return JSONResponse({"status": "ok", "base": st.registry.base_name, "adapters": list(st.registry.adapters),
                         "batching": st.worker.stats()})


async def load_adapter(request):
    reg = state(request).registry
    body = json_body(await request.body())
    name, path = body.get("name"), body.get("path")
    if not isinstance(name, str) or not isinstance(path, str):
        raise BadRequest(400, "give the adapter's name and path as strings", param="name")
    await asyncio.to_thread(reg.load, name, path)
    return JSONResponse({"loaded": name, "models": reg.names()}, status_code=201)


async def unload_adapter(request):
    reg = state(request).registry
    name = request.path_params["name"]
    await asyncio.to_thread(reg.unload, name)
    return JSONResponse({"unloaded": name, "models": reg.names()})


ROUTES = [
    Route("/health", health),  # open: a load balancer's probe carries no key
    Route("/v1/models", guarded(models)),
    Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
    Route("/v1/completions", guarded(completions), methods=["POST"]),
    Route("/admin/adapters", guarded(load_adapter), methods=["POST"]),
    Route("/admin/adapters/{name}", guarded(unload_adapter), methods=["DELETE"]),
]


def create_app(registry: Registry, *, api_key: str | None = None, max_batch: int = 16, wait_ms: float = 5.0,
               max_context: int | None = None) -> Starlette:
    """The Starlette app; `app.state.worker` is its BatchWorker (closed on shutdown)."""
    st = ServerState(registry, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms, max_context=max_context)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(st.worker.close)

    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.server, app.state.worker = st, st.worker
    return app
