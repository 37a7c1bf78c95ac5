"""Activation checkpointing for one decoder layer, optionally keeping its input in pinned CPU memory.

Only the layer's input is kept between forward and backward; backward runs the layer again and
back-propagates through it. With `offload`, that input waits in a pinned host buffer (copied with
non-blocking transfers on a side stream, one reused buffer per layer) instead of on the GPU: for
an 8B model at 2 x 2048 tokens that is 32 MiB a layer, 1 GiB a step, moved while the GPU computes.
The second run draws the same LoRA dropout masks as the first: they are functions of a seed tensor
(model.fast.dropout), not of the generator's state. A function with a `backward_through(h, grad, *extra)`
method (a decoder layer, model.fast.llama) recomputes and back-propagates itself (its MLP one chunk of
tokens at a time on long inputs, model.fast.chunked).
"""

from __future__ import annotations

import torch


class PinnedPool:
    """One growing pinned host buffer per key (a layer index). Copies run on a side stream, so they
    overlap the compute stream's work: the layer input goes out while the next layer computes, and in
    backward the input of the layer below is fetched while this one recomputes."""

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}
        self.stored: dict[int, torch.Tensor] = {}
        self.fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.pending: tuple[torch.Tensor, torch.cuda.Event] | None = None   # the last store's source
        self.stream = None

    def store(self, key: int, t: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
            # the first buffer of a key fits exactly (long inputs: 32 layers x 8 KB a token of host memory for an
            # 8B model, 128 GiB at 524,288 tokens); one that grows takes a quarter more, for the lengths to come
            size = t.numel() if buf is None or buf.dtype != t.dtype else int(t.numel() * 1.25) + 1
            buf = self.buffers[key] = self.stored[key] = None   # the old buffer goes before the new one is pinned
            buf = self.buffers[key] = torch.empty(size, dtype=t.dtype, pin_memory=True)
        view = buf[:t.numel()].view(t.shape)
        current = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(current)   # t is computed
        with torch.cuda.stream(self.stream):
            view.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        # t stays referenced until the compute stream has waited for its copy (at the next store, or at
        # finish): no record_stream, whose deferred free a CUDA graph capture cannot reuse (model.fast.graphs)
        self.finish(current)
        self.pending = (t, ev)
        self.stored[key] = view
        self.fetched.pop(key, None)
        return view

    def finish(self, current) -> None:
        """The compute stream waits for the last stored copy, and that source tensor is released."""
        if self.pending is not None:
            current.wait_event(self.pending[1])
            self.pending = None

    def _fetch(self, key: int, device) -> None:
        src = self.stored[key]
        # allocated on the compute stream, which uses and frees it: a tensor allocated on the side stream
        # would come from that stream's own pool of the caching allocator, reserved beside the main one
        t = torch.empty(src.shape, dtype=src.dtype, device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))   # t's memory is free in stream order
        with torch.cuda.stream(self.stream):
            t.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.fetched[key] = (t, ev)

    def load(self, key: int, device) -> torch.Tensor:
        """The stored tensor back on `device` (usable on the current stream); starts fetching key - 1."""
        self.finish(torch.cuda.current_stream(device))
        if key not in self.fetched:
            self._fetch(key, device)
        t, ev = self.fetched.pop(key)
        torch.cuda.current_stream(device).wait_event(ev)
        if key - 1 in self.stored and key - 1 not in self.fetched:
            self._fetch(key - 1, device)
        return t


class RecomputedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, key, pool, h, *extra):
        ctx.fn, ctx.extra, ctx.device = fn, extra, h.device
        ctx.pool, ctx.key = (pool, key) if pool is not None and h.is_cuda else (None, key)
        if ctx.pool is not None:
            pool.store(key, h.detach())
        else:
            ctx.save_for_backward(h)
        with torch.no_grad():
            return fn(h, *extra)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.pool is not None:
            h = ctx.pool.load(ctx.key, ctx.device)
        else:
            (h,) = ctx.saved_tensors
        h = h.detach().requires_grad_(True)
        through = getattr(ctx.fn, "backward_through", None)   # a decoder layer: its MLP maybe in chunks
        with torch.enable_grad():   # dropout masks are functions of a seed tensor (model.fast.dropout): the same
            if through is not None:
                through(h, grad_out, *ctx.extra)
            else:
                torch.autograd.backward(ctx.fn(h, *ctx.extra), grad_out)
        return (None, None, None, h.grad) + (None,) * len(ctx.extra)


class Span:
    """Consecutive decoder layers checkpointed as one (model.checkpoint_every): only the first one's input is
    kept (or offloaded), so the kept inputs take 1/n of the memory, for one more forward of n - 1 layers a
    step. Backward rebuilds the inner inputs without grad, then back-propagates the layers top down, each
    recomputed from its rebuilt input (dropout masks as in the forward: functions of a seed tensor)."""

    def __init__(self, layers: list):
        self.layers = layers

    def __call__(self, h: torch.Tensor, *extra) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, *extra)
        return h

    def backward_through(self, h: torch.Tensor, grad: torch.Tensor, *extra) -> None:
        inputs = [h]
        with torch.no_grad():
            for layer in self.layers[:-1]:
                inputs.append(layer(inputs[-1], *extra))
        for layer in reversed(self.layers):
            x = inputs.pop()
            x = x if x is h else x.detach().requires_grad_(True)
            through = getattr(layer, "backward_through", None)
            if through is not None:
                through(x, grad, *extra)
            else:
                torch.autograd.backward(layer(x, *extra), grad)
            grad = x.grad


def recompute(fn, h: torch.Tensor, *extra, key: int = 0, pool: PinnedPool | None = None) -> torch.Tensor:
    """fn(h, *extra) whose activations are rebuilt in backward; `extra` must not need gradients."""
    return RecomputedLayer.apply(fn, key, pool, h, *extra)
