"""The MLP half of a decoder layer over the sequence one chunk of tokens at a time (long inputs).

Why: at 131,072 tokens the MLP's intermediates dominate a layer's memory. For Llama-3.1-8B the gate/up
output (tokens x 2 x 14,336, bf16, kept for SwiGLU's backward) is 7.5 GB, the SwiGLU output (saved as the
down projection's input) 3.8 GB, and its gradient 3.8 GB more; the attention half keeps ~50 KB a token.
The MLP is per token, so it can run on row chunks of the flattened (batch x sequence) stream: the
(chunk x 2 x intermediate) buffers then exist for one chunk only.

  - forward without grad (the checkpointed forward, evaluation): each chunk's output is written back over
    its rows of the input (nothing else reads them), so no second (tokens x hidden) tensor either;
  - backward of a recomputed layer (model.fast.recompute calls _Layer.backward_through): the attention
    half is recomputed with grad as one piece, then each MLP chunk is recomputed with grad and
    back-propagated at once from its rows of the incoming gradient (the MLP runs twice per step, as
    without chunks); its input gradient is written over the chunk's rows of the attention half's output,
    which becomes the gradient the attention half is back-propagated from.

Where the layers are not recomputed (no checkpointing) the MLP runs whole, as before. The adapter's
x A^T kept between the forward and the recomputation (lora._thin_product) is not kept for chunks (their
order and sizes would have to match); it is recomputed, a rank-r product. `chunk_rows` decides from
model.mlp_chunk_tokens: `auto` chunks only batches longer than AUTO_FROM tokens, so short sequences run
exactly the unchunked code.
"""

from __future__ import annotations

import contextlib

import torch

from loraforge.model.fast.state import FastState

AUTO_CHUNK = 8192    # rows per chunk under `auto`: GEMMs of 8,192 x 4,096 x 28,672 still run at full rate
AUTO_FROM = 16384    # `auto` chunks batches of more tokens than this (two chunks or more)


def chunk_rows(tokens: int, setting: int | str | None) -> int:
    """Rows per MLP chunk for a batch of `tokens` tokens, 0 for none. `setting`: model.mlp_chunk_tokens
    ("auto", 0 = never, n = chunks of n tokens whenever the batch has more)."""
    if setting in (None, 0):
        return 0
    if setting == "auto":
        return AUTO_CHUNK if tokens > AUTO_FROM else 0
    return int(setting) if tokens > int(setting) else 0


@contextlib.contextmanager
def _no_kept_xa(state: FastState):
    """lora._thin_product computes x A^T afresh in here (a chunk's kept product could meet another chunk);
    state.dropout_rows, set per chunk, gives each chunk dropout masks of its own (model.fast.dropout:
    a mask is a function of the element's place in its tensor, the same in every chunk otherwise)."""
    keep = state.keep_xa
    state.keep_xa = False
    try:
        yield
    finally:
        state.keep_xa = keep
        state.dropout_rows = 0


def mlp_forward_chunked(mlp, h: torch.Tensor, rows: int, state: FastState) -> torch.Tensor:
    """mlp(h) without grad, `rows` tokens at a time, written over h (which must not be needed after)."""
    flat = h.view(-1, h.shape[-1])
    with torch.no_grad(), _no_kept_xa(state):
        for start in range(0, flat.shape[0], rows):
            state.dropout_rows = start
            flat[start:start + rows] = mlp(flat[start:start + rows])
    return h


def mlp_backward_chunked(mlp, mid: torch.Tensor, grad: torch.Tensor, rows: int, state: FastState) -> torch.Tensor:
    """The gradient of mlp(mid) with respect to mid, from `grad` (the gradient of the output), one chunk of
    rows at a time: each chunk recomputed with grad and back-propagated (the adapter's gradients accumulate
    into .grad). Written over mid's memory (mid's values are not needed after) and returned in its shape."""
    flat = mid.detach().view(-1, mid.shape[-1])
    g = grad.reshape(flat.shape)
    with torch.enable_grad(), _no_kept_xa(state):
        for start in range(0, flat.shape[0], rows):
            state.dropout_rows = start
            x = flat[start:start + rows].detach().requires_grad_(True)
            torch.autograd.backward(mlp(x), g[start:start + rows])
            flat[start:start + rows] = x.grad
    return flat.view(mid.shape)
