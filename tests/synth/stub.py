"""A stub OpenAI-compatible chat server on 127.0.0.1 that misbehaves on request: slow replies, 429s with
Retry-After, 500s, malformed JSON, bodies and streams cut short, hangs. Plain asyncio in a thread (HTTP/1.1,
keep-alive), so it answers thousands of requests a second and every byte it sends is under the test's control.

    with StubServer(behave=lambda req, key, attempt: "ok") as stub:
        ... stub.url ...   stub.answered[key]: replies fully sent per Idempotency-Key

`behave` returns an action: "ok", ("slow", seconds), ("status", code, headers), "malformed", "bad_shape",
"truncated" (a body shorter than its Content-Length, then the connection closes), "truncated_stream"
(server-sent events that stop before the last chunk), ("hang", seconds): no answer, then the connection closes. `reply(req, key)` returns the
assistant text and finish_reason; the default writes deterministic varied text from the request's seed.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from collections import Counter

WORDS = ("card account transfer payment refund balance pin atm fee limit exchange rate cash top-up verify "
         "identity phone app freeze block dispute charge pending declined contactless wallet salary deposit "
         "statement interest loan overdraft travel abroad currency lost stolen replace delivery address "
         "password login code beneficiary standing order direct debit cheque branch weekend urgent today "
         "yesterday twice wrong amount merchant online shop subscription cancel close open joint business").split()


def key_index(key: str | None) -> tuple[str, int]:
    """(kind, index) of a synth request key `{hash}:{kind}:{index}`."""
    if not key:
        return "", -1
    _, kind, index = key.rsplit(":", 2)
    return kind, int(index)


def default_reply(req: dict, key: str | None) -> tuple[str, str]:
    rng = random.Random(req.get("seed", 0))
    last = req["messages"][-1]["content"]
    system = req["messages"][0]["content"] if req["messages"][0]["role"] == "system" else ""
    if "List " in last and "one per line" in last:
        n = int(re.search(r"List (\d+)", last).group(1))
        return "\n".join(f"- {' '.join(rng.sample(WORDS, 2))} {k}" for k in range(n)), "stop"
    if "Write ONE new" in last:
        topic = re.search(r"Topic: (.*)", last)
        head = f"About {topic.group(1)}: " if topic else ""
        return head + " ".join(rng.sample(WORDS, 12)) + "?", "stop"
    if "Rewrite the user message" in last:
        words = re.search(r"Message: (.*)", last).group(1).split()
        rng.shuffle(words)
        return "Please: " + " ".join(words), "stop"
    if "JSON Schema" in system:
        return json.dumps({"intent": rng.choice(WORDS), "confidence": round(rng.random(), 3)}), "stop"
    return "Answer: " + " ".join(rng.sample(WORDS, 10)) + ".", "stop"


class StubServer:
    def __init__(self, behave=None, reply=None):
        self.behave = behave or (lambda req, key, attempt: "ok")
        self.reply = reply or default_reply
        self.attempts: Counter = Counter()
        self.answered: Counter = Counter()
        self.log: list[tuple[str | None, str]] = []
        self.lock = threading.Lock()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        server.close()
        # no task left pending for the garbage collector to report later (its report, formatted while some other
        # code is inside ast.parse, trips a CPython 3.11 bug: "AST constructor recursion depth mismatch")
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    def __enter__(self) -> StubServer:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self._respond(writer, body, headers):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _send(self, writer, status: int, body: bytes, extra: dict | None = None, length: int | None = None) -> None:
        reason = {200: "OK", 400: "Bad Request", 429: "Too Many Requests", 500: "Internal Server Error",
                  503: "Service Unavailable"}.get(status, "Status")
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
                f"Content-Length: {len(body) if length is None else length}"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()

    async def _respond(self, writer, raw: bytes, headers: dict) -> bool:
        req = json.loads(raw)
        key = headers.get("idempotency-key")
        with self.lock:
            self.attempts[key] += 1
            attempt = self.attempts[key]
        action = self.behave(req, key, attempt)
        name = action if isinstance(action, str) else action[0]
        with self.lock:
            self.log.append((key, name))
        if name in ("slow", "hang"):
            await asyncio.sleep(action[1])
        if name == "hang":  # never answers: the connection just closes after a while
            return False
        if name == "status":
            await self._send(writer, action[1], json.dumps({"error": {"message": "stub says no"}}).encode(), action[2])
            return True
        if name == "malformed":
            await self._send(writer, 200, b'{"choices": [{"message": {"content": "unterminated')
            return True
        if name == "bad_shape":
            await self._send(writer, 200, b'{"result": "not a chat completion"}')
            return True
        text, finish = self.reply(req, key)
        usage = {"prompt_tokens": sum(len(m["content"].split()) for m in req["messages"]),
                 "completion_tokens": len(text.split())}
        if req.get("stream"):
            return await self._stream(writer, req, key, text, finish, usage, name == "truncated_stream")
        body = json.dumps({"id": "stub", "object": "chat.completion", "model": req["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": finish}], "usage": usage}).encode()
        if name == "truncated":
            await self._send(writer, 200, body[:len(body) // 2], length=len(body))
            return False
        await self._send(writer, 200, body)
        with self.lock:
            self.answered[key] += 1
        return True

    async def _stream(self, writer, req, key, text, finish, usage, cut: bool) -> bool:
        words = text.split(" ")
        chunks = [{"choices": [{"index": 0, "delta": {"content": w + (" " if k < len(words) - 1 else "")},
                                "finish_reason": None}], "model": req["model"]} for k, w in enumerate(words)]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "model": req["model"]})
        chunks.append({"choices": [], "usage": usage})
        events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
        if cut:
            events = events[:max(1, len(events) // 2 - 1)]
        data = "".join(events).encode()  # one chunk of a chunked body; the connection stays open
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
        await writer.drain()
        if not cut:
            with self.lock:
                self.answered[key] += 1
        return True
