"""An OpenAI-compatible chat client that survives real servers: asyncio + httpx2, many requests in flight.

    async with ChatClient(spec.endpoint) as client:
        reply = await client.chat(key, messages, seed=7)      # Reply, or RequestFailed after retries

Retried (up to `max_retries`, exponential backoff with full jitter, capped at `max_backoff_s`): HTTP
429 and 5xx, timeouts, dropped connections, a body cut short, a reply that is not an OpenAI chat
completion, a stream that ends before its last chunk. A server's `Retry-After` (seconds or an HTTP
date) or `retry-after-ms` is honoured as the least wait. HTTP 401/403/404 stop the whole run at
once (a wrong key, model or URL fails every request alike); other 4xx fail that request only.
`Usage` counts requests, retries, failures by reason and the tokens of the `usage` field.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from loraforge.errors import LoraforgeError
from loraforge.synth.spec import Endpoint

try:  # orjson (a loraforge dependency) is 5-10x faster than json for bodies and replies
    from orjson import dumps as _dumps, loads as _loads
except ImportError:  # pragma: no cover
    def _dumps(v: object) -> bytes:
        return json.dumps(v).encode()
    _loads = json.loads

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
FATAL_STATUS = {401: "the API key was refused", 403: "the API key may not use this model",
                404: "no such endpoint or model"}


class RequestFailed(Exception):
    """One request failed for good; `reason` is a short kind (http_400, timeout, malformed, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _Retry(Exception):
    def __init__(self, reason: str, detail: str, wait: float = 0.0):
        super().__init__(detail)
        self.reason, self.detail, self.wait = reason, detail, wait


@dataclass
class Reply:
    content: str
    finish_reason: str | None
    usage: dict
    model: str | None
    attempts: int


@dataclass
class Usage:
    requests: int = 0            # answered
    attempts: int = 0            # HTTP requests sent
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: Counter = field(default_factory=Counter)      # reason -> requests that failed for good
    retry_reasons: Counter = field(default_factory=Counter)  # reason -> retries

    def add(self, usage: dict) -> None:
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def cost(self, endpoint: Endpoint) -> float:
        return (self.prompt_tokens * endpoint.price_per_1m_input
                + self.completion_tokens * endpoint.price_per_1m_output) / 1e6

    def to_dict(self, endpoint: Endpoint | None = None) -> dict:
        d = {"requests": self.requests, "attempts": self.attempts, "retries": self.retries,
             "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
             "failures": dict(self.failures), "retry_reasons": dict(self.retry_reasons)}
        if endpoint is not None:
            d["cost_usd"] = round(self.cost(endpoint), 6)
        return d


def retry_after(headers) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or a date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def endpoint_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return f"{base if base.endswith('/v1') else base + '/v1'}/chat/completions"


def _completion(data: object) -> tuple[str, str | None, dict, str | None]:
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _Retry("malformed", f"not an OpenAI chat completion: {json.dumps(data)[:200]}") from None
    if not isinstance(content, str):
        raise _Retry("malformed", f"message content is {type(content).__name__}, not text")
    return content, choice.get("finish_reason"), data.get("usage") or {}, data.get("model")


class ChatClient:
    """See the module docstring. One instance per run; use as an async context manager."""

    def __init__(self, endpoint: Endpoint, api_key: str | None = None, *, rng: random.Random | None = None):
        try:
            import httpx2 as httpx  # httpx's successor (what the openai client uses); same API
        except ImportError:
            try:
                import httpx
            except ImportError:
                raise LoraforgeError("loraforge data synth needs httpx2 (or httpx)",
                                     hint="pip install 'loraforge[synth]'") from None
        self.httpx, self.endpoint, self.url = httpx, endpoint, endpoint_url(endpoint.base_url)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.usage = Usage()
        self.rng = rng or random.Random()
        self.fatal: LoraforgeError | None = None
        self._client = None

    async def __aenter__(self) -> ChatClient:
        httpx, e = self.httpx, self.endpoint
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(e.timeout_s, connect=min(e.timeout_s, 30.0)),
            limits=httpx.Limits(max_connections=e.concurrency, max_keepalive_connections=e.concurrency))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()

    def body(self, messages: list[dict], seed: int | None, response_format: dict | None = None) -> dict:
        e = self.endpoint
        body: dict = {"model": e.model, "messages": messages, "temperature": e.temperature, "max_tokens": e.max_tokens}
        if e.top_p is not None:
            body["top_p"] = e.top_p
        if e.stop:
            body["stop"] = e.stop
        if seed is not None and e.send_seed:
            body["seed"] = seed
        if response_format is not None:
            body["response_format"] = response_format
        if e.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def chat(self, key: str, messages: list[dict], seed: int | None = None,
                   response_format: dict | None = None) -> Reply:
        """One chat completion, retried as the module docstring says."""
        body = _dumps(self.body(messages, seed, response_format))
        headers = {**self.headers, "Idempotency-Key": key}
        e = self.endpoint
        for attempt in range(e.max_retries + 1):
            if self.fatal is not None:
                raise self.fatal
            self.usage.attempts += 1
            try:
                content, finish, usage, model = await self._once(body, headers)
            except _Retry as r:
                if attempt == e.max_retries:
                    self.usage.failures[r.reason] += 1
                    raise RequestFailed(r.reason, f"{r.detail} (after {attempt + 1} attempts)") from None
                self.usage.retries += 1
                self.usage.retry_reasons[r.reason] += 1
                backoff = self.rng.uniform(0, min(e.max_backoff_s, e.backoff_s * 2 ** attempt))
                await asyncio.sleep(max(backoff, min(r.wait, e.max_backoff_s)))  # Retry-After, within the cap
                continue
            except RequestFailed as f:
                self.usage.failures[f.reason] += 1
                raise
            self.usage.requests += 1
            self.usage.add(usage)
            return Reply(content, finish, usage, model, attempt + 1)
        raise AssertionError("unreachable")

    async def _once(self, body: bytes, headers: dict) -> tuple[str, str | None, dict, str | None]:
        httpx = self.httpx
        try:
            if self.endpoint.stream:
                return await self._stream(body, headers)
            r = await self._client.post(self.url, content=body, headers=headers)
            self._check_status(r.status_code, r.headers, r.content)
            try:
                data = _loads(r.content)
            except ValueError:
                raise _Retry("malformed", f"reply is not JSON: {r.content[:200]!r}") from None
            return _completion(data)
        except httpx.TimeoutException:
            raise _Retry("timeout", f"no reply within {self.endpoint.timeout_s:g}s") from None
        except httpx.TransportError as err:  # refused, reset, a body cut short (RemoteProtocolError)
            raise _Retry("connection", f"{type(err).__name__}: {err}"[:300]) from None

    def _check_status(self, status: int, headers, content: bytes) -> None:
        if status == 200:
            return
        text = content[:200].decode("utf-8", "replace")
        if status in FATAL_STATUS:
            self.fatal = LoraforgeError(
                f"HTTP {status} from {self.url}: {FATAL_STATUS[status]} ({text})",
                hint="check endpoint.base_url, endpoint.model and endpoint.api_key_env")
            raise self.fatal
        if status in RETRY_STATUS:
            raise _Retry(f"http_{status}", f"HTTP {status}: {text}", retry_after(headers) or 0.0)
        raise RequestFailed(f"http_{status}", text)

    async def _stream(self, body: bytes, headers: dict) -> tuple[str, str | None, dict, str | None]:
        """Server-sent events, read whole (the timeout is per read, so a long stream is fine), then parsed:
        2.2x the requests/s of reading it line by line through the client (195 -> 429 against the stub,
        bench/synth_throughput.py --stream), with the same check that the stream ended."""
        r = await self._client.post(self.url, content=body, headers=headers)
        self._check_status(r.status_code, r.headers, r.content)
        parts: list[str] = []
        finish, usage, model, done = None, {}, None, False
        for line in r.content.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            try:
                chunk = _loads(payload)
            except ValueError:
                raise _Retry("malformed", f"a stream chunk is not JSON: {payload[:200]!r}") from None
            usage = chunk.get("usage") or usage
            model = chunk.get("model") or model
            for choice in chunk.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
        if not done and finish is None:
            raise _Retry("truncated_stream", "the stream ended before its last chunk")
        return "".join(parts), finish, usage, model
