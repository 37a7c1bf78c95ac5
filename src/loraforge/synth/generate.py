"""The request phase: the diversity lists first (when generated), then every item, `concurrency` at a time.

Each item is a short chain (generate: write a user message, then answer it; rewrite: reword a message,
then answer it or keep its answer; distill: answer a given message). Every reply goes to the journal
as it arrives and is read back from it on a rerun, so a killed run asks only what is missing. An item
whose request fails for good (after the client's retries) becomes an `Outcome` with `failed` set:
the verifier counts it as a reject and a rerun asks it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loraforge.errors import LoraforgeError
from loraforge.synth import prompts as P
from loraforge.synth.client import ChatClient, RequestFailed
from loraforge.synth.journal import Journal
from loraforge.synth.spec import Spec


@dataclass
class Item:
    """One example to make: its index, its diversity slot, and for distill/rewrite its given text."""

    index: int
    slot: P.Slot = P.Slot()
    prompt: str | None = None
    answer: str | None = None
    label: str | None = None
    source: str | None = None


@dataclass
class Outcome:
    item: Item
    prompt: str | None = None
    answer: str | None = None
    entries: list[dict] = field(default_factory=list)   # the journal entries behind it, in order
    failed: tuple[str, str] | None = None               # (reason, detail)

    @property
    def truncated(self) -> bool:
        return any(e.get("finish_reason") == "length" for e in self.entries)


class Generator:
    """Runs the request phase for one spec against one journal (see the module docstring)."""

    def __init__(self, spec: Spec, journal: Journal, seeds: list[tuple[str, str]],
                 log: Callable[[str], None] = lambda m: None, progress_every_s: float = 5.0):
        self.spec, self.journal, self.seeds, self.log = spec, journal, seeds, log
        self.hash = spec.generation_hash()
        self.progress_every_s = progress_every_s
        self.client: ChatClient | None = None
        self.asked = 0

    def key(self, kind: str, index: int | str) -> str:
        return f"{self.hash}:{kind}:{index}"

    async def ask(self, kind: str, index: int | str, messages: list[dict], response_format: dict | None = None) -> dict:
        """The journal's entry for this request, asking the endpoint only when it has none."""
        key = self.key(kind, index)
        entry = self.journal.get(key)
        if entry is not None:
            return entry
        seed = P.request_seed(self.spec.seed, index if isinstance(index, int) else 0, kind)
        reply = await self.client.chat(key, messages, seed, response_format)
        self.asked += 1
        entry = {"key": key, "kind": kind, "index": index, "content": reply.content,
                 "finish_reason": reply.finish_reason, "usage": reply.usage,
                 "model": reply.model or self.spec.endpoint.model, "seed": seed,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "attempts": reply.attempts}
        self.journal.append(entry)
        return entry

    async def plan_list(self, what: str, n: int) -> list[str]:
        try:
            entry = await self.ask(f"plan-{what}", 0, P.plan_messages(self.spec.task, what, n))
        except RequestFailed as f:
            raise LoraforgeError(f"asking the endpoint for diversity.{what} failed: {f}") from None
        items = P.parse_list(entry["content"], n)
        if not items:
            raise LoraforgeError(f"the endpoint wrote no {what} for diversity.{what}.generate "
                                 f"(its reply: {entry['content'][:200]!r})",
                                 hint=f"list the {what} in the spec instead")
        return items

    async def one(self, item: Item) -> Outcome:
        spec, out = self.spec, Outcome(item)
        i, prompt = item.index, item.prompt
        try:
            if spec.mode == "generate":
                seed_prompts = [u for u, _ in self.seeds]
                e = await self.ask("q", i, P.question_messages(spec.task, item.slot, seed_prompts, i, spec.seed))
                out.entries.append(e)
                prompt = P.clean_message(e["content"])
            elif spec.mode == "rewrite":
                e = await self.ask("r", i, P.rewrite_messages(spec.task, item.slot, item.prompt))
                out.entries.append(e)
                prompt = P.clean_message(e["content"])
            out.prompt = prompt
            if spec.answer == "topic":
                out.answer = item.slot.topic
            elif spec.mode == "rewrite" and spec.keep_answer:
                out.answer = item.answer
            elif prompt and prompt.strip():
                schema = spec.output.json_schema if spec.output.format == "json" else None
                rf = ({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
                      if schema is not None and spec.output.response_format else None)
                e = await self.ask("a", i, P.answer_messages(spec.task, self.seeds, prompt, schema), rf)
                out.entries.append(e)
                out.answer = e["content"]
        except RequestFailed as f:
            out.failed = (f.reason, f.detail)
        return out

    async def _run(self, lists_needed: dict[str, int], make_items: Callable) -> tuple[list[Item], list[Outcome]]:
        async with ChatClient(self.spec.endpoint, self.spec.endpoint.api_key()) as client:
            self.client = client
            lists = {what: await self.plan_list(what, n) for what, n in lists_needed.items()}
            items = make_items(lists)
            outcomes: list[Outcome | None] = [None] * len(items)
            queue = iter(range(len(items)))
            last = [time.monotonic()]

            async def worker() -> None:
                for k in queue:
                    outcomes[k] = await self.one(items[k])
                    if time.monotonic() - last[0] >= self.progress_every_s:
                        last[0] = time.monotonic()
                        done = sum(o is not None for o in outcomes)
                        self.log(f"synth: {done}/{len(items)} items, {client.usage.requests} requests answered, "
                                 f"{client.usage.retries} retries, {sum(client.usage.failures.values())} failed")

            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(min(self.spec.endpoint.concurrency, max(1, len(items)))):
                        tg.create_task(worker())
            except* LoraforgeError as group:
                raise group.exceptions[0] from None
            return items, outcomes  # type: ignore[return-value]

    def run(self, lists_needed: dict[str, int], make_items: Callable) -> tuple[list[Item], list[Outcome]]:
        """The items and every item's outcome, in order. The diversity lists named in `lists_needed`
        ({"topics": 20}) are asked for first; `make_items(lists)` then makes the items."""
        try:
            return asyncio.run(self._run(lists_needed, make_items))
        finally:
            self.journal.sync()
