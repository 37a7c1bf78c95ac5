"""OpenAI-compatible HTTP server over one base model and its LoRA adapters (Starlette + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (SSE streaming or not),
POST /v1/completions, and the admin endpoints POST /admin/adapters {"name", "path"} and
DELETE /admin/adapters/{name}. The request's `model` names an adapter or the base itself. Handlers only
validate and enqueue; the BatchWorker does the generating (continuous batching). Every user mistake is a
4xx JSON error in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Sampling: `temperature` (0 = greedy, up to 2), `top_p` (0 < p <= 1), `seed` (same seed, same answer),
`stop` (a string or up to 4), `max_tokens` / `max_completion_tokens`, and `n` = 1 only. Unlike OpenAI,
an absent temperature means greedy, so a fine-tuned model answers reproducibly unless asked to sample.
`ignore_eos` (as in vLLM) decodes through end-of-turn tokens up to max_tokens, for load tests.

Messages: roles system (or developer), user and assistant; `content` a string or OpenAI's list of parts
(text parts only). A tool/function message or an unknown role is a 400 (no tool calling). A last message
from the assistant is continued: its text is the start of the answer, and the reply holds what follows.
A client that goes away (streaming or not) cancels its request: its row leaves the batch at the next step.
Structured output: `response_format` {"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}
decodes only JSON that satisfies the schema, {"type": "json_object"} only a JSON object, {"type": "text"}
anything (the default); grammars are compiled once per schema (llguidance; extra `structured`) and cached.

Where things are: parsing.py checks a request body, app.py is the Starlette app (routes, the API-key
check, error types -> status codes), errors.py the error types; this file loads the model and runs uvicorn.
torch, transformers and peft are imported where first used in serve/, not at module top: `serve` takes
its port and says a busy one before paying for them (measured on the 2-core dev box, loaded: `loraforge
serve --port BUSY` answers in 2.4 s; `python -c "import torch, transformers, peft"` alone takes 22 s).
"""

from __future__ import annotations

import importlib
import socket
import sys

from loraforge.errors import LoraforgeError
from loraforge.model.load import load_base, pick_device
from loraforge.serve.errors import BadRequest
from loraforge.serve.parsing import chat_messages, context_limit, parse_sampling
from loraforge.serve.registry import Registry

__all__ = ["BadRequest", "bind", "build_app", "chat_messages", "context_limit", "load_registry", "parse_sampling",
           "serve"]


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LoraforgeError(f"`loraforge serve` needs {module.split('.')[0]}",
                             hint="pip install 'loraforge[serve]'") from None


def build_app(registry: Registry, *, api_key: str | None = None, max_batch: int = 16, wait_ms: float = 5.0,
              max_context: int | None = None):
    """The Starlette app (serve/app.py); `app.state.worker` is its BatchWorker (closed on shutdown)."""
    _need("starlette")
    from loraforge.serve.app import create_app  # lazy: starlette is the optional `serve` extra

    return create_app(registry, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms, max_context=max_context)


def load_registry(base: str, adapters: dict[str, str], *, device: str = "auto", name: str | None = None) -> Registry:
    model, tok, _ = load_base(base, device=pick_device(device))
    model.eval()
    registry = Registry(model, tok, name or base)
    for n, p in adapters.items():
        registry.load(n, p)
    return registry


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads, so a busy port is said at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        busy = e.errno in (98, 48, 10048)  # EADDRINUSE on Linux, macOS, Windows
        raise LoraforgeError(f"cannot listen on {host}:{port}: " + ("the port is in use" if busy else e.strerror),
                             hint="pick another --port, or stop what listens there" if busy else
                             "check --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(base: str, adapters: dict[str, str], *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 16, wait_ms: float = 5.0, device: str = "auto",
          name: str | None = None) -> None:
    """Take the port, load everything (CLI errors surface before anyone can connect), then serve until Ctrl-C."""
    uvicorn = _need("uvicorn")
    _need("starlette")
    sock = bind(host, port)
    registry = load_registry(base, adapters, device=device, name=name)
    app = build_app(registry, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {', '.join(registry.names())} on http://{shown}:{sock.getsockname()[1]}/v1 "
          f"(OpenAI-compatible; Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
