"""Continuous (iteration-level) batching: one worker thread decodes every running request one token per step.

Between two decode steps the worker drops the rows that finished or were cancelled and admits waiting
requests: their prompts are prefilled together (left-padded, one forward) and their key/value caches
are joined to the running batch's. The batch is one left-padded KV cache with a padding mask: each row's
real tokens sit at the right end, its positions count only its own tokens, and the mask hides the padding
from attention, so a row decodes the same tokens whether it ran alone or beside others. Every forward
passes PEFT's `adapter_names=` (one per row, "__base__" for the bare model): one batch carries many
adapters, each row only ever sees its own. A row whose adapter was unloaded (or reloaded) since it was
admitted is stopped with "adapter_unloaded", never decoded with another adapter. A request with a
response_format has its row's logits masked by its own grammar state at every step (`_pick`).

The registry is held per step (`Registry.step()`), not per request, so an adapter can be loaded or
unloaded while others are decoding. A failing forward fails the requests in it, never the worker.
"""

from __future__ import annotations

import queue
import threading
import time

from loraforge.eval.structured import mask_logits
from loraforge.model.attention import decode_attention
from loraforge.model.decode import cache_argument
from loraforge.serve.decoding import Job, Sampling, pick_token
from loraforge.serve.registry import BASE, Registry

__all__ = ["BatchWorker", "Job", "Sampling"]

# torch, transformers and peft are imported inside the functions that use them: see server.py


class _Rows:
    """The running batch: jobs, their KV cache (left-padded), padding mask and the token each feeds next."""

    def __init__(self):
        self.jobs: list[Job] = []
        self.serials: list[int] = []   # the adapter load each row started with
        self.cache = None              # transformers DynamicCache, batch dim = rows
        self.mask = None               # (rows, cache length) long, 1 = a real token
        self.last = None               # (rows,) long

    def keep(self, keep: list[int]) -> None:
        import torch

        if len(keep) == len(self.jobs):
            return
        self.jobs = [self.jobs[i] for i in keep]
        self.serials = [self.serials[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.mask, self.last = self.mask[idx], self.last[idx]
        self.cache.batch_select_indices(idx)
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
        if lead:
            self.mask = self.mask[:, lead:]
            self.cache = _rebuild(self.cache, lambda t: t[:, :, lead:, :])

    def add(self, jobs: list[Job], serials: list[int], cache, mask, last) -> None:
        import torch

        if not self.jobs:
            self.jobs, self.serials, self.cache, self.mask, self.last = list(jobs), list(serials), cache, mask, last
            return
        width = max(self.mask.shape[1], mask.shape[1])
        a, b = self.mask.shape[1], mask.shape[1]
        old = [(k, v) for k, v, *_ in self.cache]
        new = [(k, v) for k, v, *_ in cache]
        layers = [(torch.cat([_left_pad(ka, width - a), _left_pad(kb, width - b)]),
                   torch.cat([_left_pad(va, width - a), _left_pad(vb, width - b)]))
                  for (ka, va), (kb, vb) in zip(old, new)]
        from transformers import DynamicCache

        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([_left_pad_2d(self.mask, width - a), _left_pad_2d(mask, width - b)])
        self.last = torch.cat([self.last, last])
        self.jobs += jobs
        self.serials += serials


def _left_pad(t, n: int):
    """(batch, heads, length, dim) -> n zero columns in front of `length`."""
    import torch

    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def _left_pad_2d(m, n: int):
    import torch

    return m if n == 0 else torch.cat([m.new_zeros(m.shape[0], n), m], dim=1)


def _rebuild(cache, fn):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(fn(k), fn(v)) for k, v, *_ in cache])


class BatchWorker:
    """Owns the model's forward passes; `submit` a Job and read its `emit` callbacks."""

    def __init__(self, registry: Registry, *, max_batch: int = 16, wait_ms: float = 5.0):
        from loraforge.eval.generate import stop_token_ids  # lazy: eval.generate imports torch (see server.py)

        self.registry, self.max_batch, self.wait = registry, max_batch, wait_ms / 1000
        self.stops = set(stop_token_ids(registry.tokenizer, registry.model))
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.rows = _Rows()
        self.prefills = 0       # forwards that admitted requests
        self.steps = 0          # decode forwards
        self.decoded = 0        # rows decoded, summed over steps
        self.max_rows = 0       # most rows in one decode step
        self.thread = threading.Thread(target=self._run, name="loraforge-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def stats(self) -> dict:
        return {"running": len(self.rows.jobs), "waiting": self.queue.qsize(), "prefills": self.prefills,
                "decode_steps": self.steps, "max_rows": self.max_rows,
                "mean_rows": round(self.decoded / self.steps, 2) if self.steps else 0.0}

    # -- the loop ---------------------------------------------------------------------------------------
    def _take(self) -> tuple[list[Job], bool]:
        """Waiting jobs that fit in the batch; blocks (then waits `wait` for company) only when idle."""
        room = self.max_batch - len(self.rows.jobs)
        jobs: list[Job] = []
        if room <= 0:
            return jobs, False
        if not self.rows.jobs:
            first = self.queue.get()
            if first is None:
                return jobs, True
            jobs.append(first)
            deadline = time.monotonic() + self.wait  # idle: wait a moment for company
        else:
            deadline = None                          # running: take only who is already waiting
        while len(jobs) < room:
            try:
                nxt = self.queue.get_nowait() if deadline is None else \
                    self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                return jobs, True
            jobs.append(nxt)
        return jobs, False

    def _run(self) -> None:
        import torch

        while True:
            joiners, closing = self._take()
            if closing:
                for j in [*self.rows.jobs, *joiners]:
                    j.fail("error", "the server is shutting down")
                self.rows.keep([])
                return
            with self.registry.step() as model, torch.no_grad():
                self._drop_finished()
                joiners = self._admissible(joiners)
                if joiners:
                    try:
                        self._prefill(model, joiners)
                    except Exception as e:  # noqa: BLE001 - a bad request fails itself, never the worker
                        for j in joiners:
                            j.fail("error", f"[error] {type(e).__name__}: {e}")
                    self._drop_finished()
                if self.rows.jobs:
                    try:
                        self._decode(model)
                    except Exception as e:  # noqa: BLE001
                        for j in self.rows.jobs:
                            j.fail("error", f"[error] {type(e).__name__}: {e}")
                        self.rows.keep([])
                    self._drop_finished()

    def _serial(self, adapter: str) -> int | None:
        return 0 if adapter == BASE else self.registry.serial(adapter)

    def _admissible(self, jobs: list[Job]) -> list[Job]:
        out = []
        for j in jobs:
            if j.cancelled.is_set():
                j.fail("cancelled")
            elif self._serial(j.adapter) is None:
                j.fail("adapter_unloaded")
            else:
                out.append(j)
        return out

    def _drop_finished(self) -> None:
        keep = []
        for i, (j, serial) in enumerate(zip(self.rows.jobs, self.rows.serials)):
            if j.cancelled.is_set():
                j.fail("cancelled")
            elif self._serial(j.adapter) != serial:
                j.fail("adapter_unloaded")
            if not j.done:
                keep.append(i)
        self.rows.keep(keep)

    def _forward(self, model, ids, mask, positions, cache, adapters: list[str]):
        from peft import PeftModel

        kwargs = {}
        if isinstance(model, PeftModel):
            kwargs["adapter_names"] = adapters
        elif any(a != BASE for a in adapters):
            raise RuntimeError("adapter requested but none is loaded")
        with decode_attention(ids.device):
            kwargs[cache_argument(model)] = cache
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                        **kwargs)
        return out.logits[:, -1, :].float().cpu()

    def _pick(self, jobs: list[Job], logits) -> list[int]:
        constrained = [j.grammar for j in jobs]
        if any(g is not None for g in constrained):  # per request: only the tokens its grammar permits
            mask_logits(logits, constrained)
        out = self._choose(jobs, logits)
        for g, t in zip(constrained, out):
            if g is not None:
                g.advance(t)
        return out

    def _choose(self, jobs: list[Job], logits) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, j in enumerate(jobs):
            if j.sampling.temperature == 0:
                out.append(greedy[i])
            else:
                if j.rng is None:
                    j.rng = j.sampling.generator()
                out.append(pick_token(logits[i], j.sampling, j.rng))
        return out

    def _prefill(self, model, jobs: list[Job]) -> None:
        import torch
        from transformers import DynamicCache

        device = next(model.parameters()).device
        tok = self.registry.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        serials = [self._serial(j.adapter) for j in jobs]
        logits = self._forward(model, ids, mask, positions, cache, [j.adapter for j in jobs])
        first = self._pick(jobs, logits)
        self.prefills += 1
        for j, t in zip(jobs, first):
            j.push(t, tok, self.stops)
        self.rows.add(jobs, serials, cache, mask, torch.tensor(first, device=device))

    def _decode(self, model) -> None:
        import torch

        rows = self.rows
        positions = rows.mask.sum(1, keepdim=True)  # each row's own next position
        mask = torch.cat([rows.mask, rows.mask.new_ones(rows.mask.shape[0], 1)], dim=1)
        logits = self._forward(model, rows.last[:, None], mask, positions, rows.cache, [j.adapter for j in rows.jobs])
        rows.mask = mask
        nxt = self._pick(rows.jobs, logits)
        rows.last = torch.tensor(nxt, device=mask.device)
        self.steps += 1
        self.decoded += len(rows.jobs)
        self.max_rows = max(self.max_rows, len(rows.jobs))
        for j, t in zip(rows.jobs, nxt):
            j.push(t, self.registry.tokenizer, self.stops)
