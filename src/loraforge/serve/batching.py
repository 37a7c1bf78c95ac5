"""One worker thread drains a queue of generation requests into mixed-adapter batches.

Requests wait at most `wait_ms` for company, then up to `max_batch` of them are left-padded into one
batch and decoded greedily by `model.generate(..., adapter_names=[...])`: PEFT applies each row's own
adapter (or none, "__base__"), so one batch carries many adapters without mixing them up. A streamer
hands every new token to its request's `emit` callback; a request stops at its own end-of-turn token or
max_tokens, and the batch stops when every request is done or cancelled (a client that went away).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from loraforge.serve.registry import BASE, Registry


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str                       # adapter name or BASE
    max_tokens: int
    emit: Callable[[str | None, str | None], None]  # (text delta, finish_reason or None); thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    completion_tokens: int = 0

    def finish(self, reason: str, tokenizer=None) -> None:
        if not self.done:
            self.done = True
            if tokenizer is not None and reason != "cancelled":  # flush a held-back partial character
                text = tokenizer.decode(self.tokens, skip_special_tokens=True)
                if text[len(self.text):]:
                    self.emit(text[len(self.text):], None)
                self.text = text
            self.emit(None, reason)


class _Streamer:
    """transformers streamer protocol: put() gets the prompt batch first, then one token per row."""

    def __init__(self, jobs: list[Job], tokenizer, stops: set[int]):
        self.jobs, self.tok, self.stops, self.first = jobs, tokenizer, stops, True

    def put(self, value) -> None:
        if self.first:  # the prompt itself
            self.first = False
            return
        for job, t in zip(self.jobs, value.reshape(-1).tolist()):
            if job.done:
                continue
            if job.cancelled.is_set():
                job.finish("cancelled")
                continue
            if t in self.stops:
                job.finish("stop", self.tok)
                continue
            job.tokens.append(t)
            job.completion_tokens += 1
            text = self.tok.decode(job.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back half a multi-byte character
                delta, job.text = text[len(job.text):], text
                if delta:
                    job.emit(delta, None)
            if job.completion_tokens >= job.max_tokens:
                job.finish("length", self.tok)

    def end(self) -> None:
        for job in self.jobs:
            job.finish("length", self.tok)


class _AllDone:
    """Stopping criterion: every request in the batch finished or was cancelled."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = all(j.done or j.cancelled.is_set() for j in self.jobs)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class BatchWorker:
    def __init__(self, registry: Registry, *, max_batch: int = 16, wait_ms: float = 5.0):
        from loraforge.eval.generate import stop_token_ids

        self.registry, self.max_batch, self.wait = registry, max_batch, wait_ms / 1000
        self.stops = set(stop_token_ids(registry.tokenizer, registry.model))
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._run, name="loraforge-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            jobs = [job]
            deadline = time.monotonic() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                jobs.append(nxt)
            jobs = [j for j in jobs if not (j.cancelled.is_set() and j.finish("cancelled") is None)]
            if not jobs:
                continue
            try:
                self._generate(jobs)
            except Exception as e:  # a bad batch fails its requests, never the worker
                for j in jobs:
                    j.emit(f"[error] {type(e).__name__}: {e}", "error") if not j.done else None
                    j.done = True
            self.batches += 1

    def _generate(self, jobs: list[Job]) -> None:
        import torch
        from peft import PeftModel
        from transformers import StoppingCriteriaList

        tok = self.registry.tokenizer
        width = max(len(j.prompt_ids) for j in jobs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        with self.registry.lock, torch.no_grad():
            model = self.registry.model
            kwargs = {}
            missing = [j for j in jobs if j.adapter != BASE and j.adapter not in self.registry.adapters]
            for j in missing:  # unloaded while it waited
                j.emit(None, "adapter_unloaded")
                j.done = True
            jobs_live = [j for j in jobs if not j.done]
            if not jobs_live:
                return
            if isinstance(model, PeftModel):
                kwargs["adapter_names"] = [j.adapter if not j.done else BASE for j in jobs]
            elif any(j.adapter != BASE for j in jobs_live):
                raise RuntimeError("adapter requested but none is loaded")
            device = next(model.parameters()).device
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                           max_new_tokens=max(j.max_tokens for j in jobs), do_sample=False,
                           eos_token_id=sorted(self.stops), pad_token_id=pad, temperature=None, top_p=None,
                           top_k=None, streamer=_Streamer(jobs, tok, self.stops),
                           stopping_criteria=StoppingCriteriaList([_AllDone(jobs)]), **kwargs)
