"""How many more tokens a forward without grad may take than a training step, on the fast path: the multiplier of
validation's token budget (train.validation_forwards).

A validation forward keeps no activations: each layer's tensors are freed once the next layer has its input. A
training step keeps some through its whole stack. Both are counted here per token of a batch, in elements of the
compute dtype, from what the fast path allocates (model.fast.llama, lora, swiglu_lora, ops, recompute, graphs), with
L layers, hidden size H, q the query projection's width, kv the key and value projections' together, I the MLP's
intermediate size:

  training step, a floor (beside the weights, adapter gradients and optimizer state, which validation shares):
    - where the stack is recomputed in backward (gradient checkpointing, and CUDA graphs, whose graphed stack
      recomputes each layer too): each layer's input, L x H; none with offload (they wait in pinned host memory);
      with checkpoint_every n, the inputs of the spans and one span's n - 1 inner inputs. Plus the tensors the
      layer being recomputed saves for its backward: the first norm's output (H), q/k/v (q + kv), the attention
      output (q), the residual after attention (H) and, unless the MLP runs in chunks (model.fast.chunked), the
      second norm's output (H), gate/up (2I) and the SwiGLU output (I);
    - without recomputation (no checkpointing, no graphs), every layer's input and saved tensors.
  validation forward, a ceiling: the most one layer holds at once, its input included (FastLlama.hidden keeps it
    until the layer returns): in attention the input, the norm's output, q/k/v, normed and rotated copies of q and
    k (Qwen3's q/k norms, the unfused RoPE), the attention output, the o projection's output and the new residual
    (an unfused add), within 4H + 4q + 3kv; in the MLP the input, the residual, the norm's output, gate/up and the
    SwiGLU output, 3H + 3I (5H + I while the down projection adds its output, unfused); at the head the final
    norm's output, its flattened copy and the loss rows, (2 + f)H, then the loss itself:
    liger's fused cross-entropy holds, per loss row, the row, its input gradient (computed in the forward, grad or
    not) and a logits chunk of at most 2 x 8 H elements (ops._flce_chunking's chunk_mem_const 8, the chunk's rows
    rounded up to a power of two): LOSS_ROW_H x H, for the f x tokens that carry loss (f: the largest share of
    loss tokens of one validation example, so no forward has more loss rows than f x its padded tokens).

The multiplier is training / validation, clamped to 1..MAX_SCALE: validation's forward then holds no more than
training's activations did. Left out on both sides: the rank-r LoRA products (N x r), flash attention's
log-sum-exp, and the loss path below liger's, over at most ops.SMALL_LOSS_BYTES (64 MiB) of fp32 logits (with
their bf16 product and logsumexp's temporary, under 2.5 times that): a constant either side may hold. Where CUDA
graphs replay training, the captured stack's memory is a pool of their own, held beside validation's eager forward
rather than reused by it, as it was with the old budget; graphs apply to host-bound steps only
(model.fast.graphs.host_bound), small ones. Under FSDP2 (a sharded FastLlama) the multiplier is 1: its
vocabulary-parallel loss gathers every rank's rows.
"""

from __future__ import annotations

import math

from loraforge.model.fast.chunked import chunk_rows

MAX_SCALE = 8.0     # beyond this the forwards are few and long: no host overhead left to save
LOSS_ROW_H = 2 + 2 * 8   # liger's fused loss per loss row, in units of H: the row, its gradient, the logits chunk


def layer_sizes(fast) -> tuple[int, int, int, int, int]:
    """(L, H, q, kv, I) of a FastLlama: layers, hidden size, the query projection's width, the key and value
    projections' together, the MLP's intermediate size (read from its first layer's projections)."""
    layer = fast.layers[0]
    outs = layer.qkv.outs
    return len(fast.layers), layer.norm1.weight.shape[0], outs[0], sum(outs[1:]), layer.gate_up.outs[0]


def step_floor(sizes: tuple[int, int, int, int, int], *, recomputed: bool, offload: bool = False, span: int = 1,
               chunked: bool = False) -> int:
    """Elements per token a training step holds at least (see the module's docstring). `recomputed`: the stack is
    recomputed in backward (checkpointing or CUDA graphs); `offload`: the layer inputs wait in host memory; `span`:
    model.checkpoint_every; `chunked`: the MLP runs in chunks of tokens."""
    n_layers, h, q, kv, inter = sizes
    attention = 2 * h + 2 * q + kv          # norm output, q/k/v, attention output, residual
    mlp = h + 3 * inter                     # norm output, gate/up, SwiGLU output
    if not recomputed:                      # every layer's input and saved tensors (the MLP whole)
        return n_layers * (h + attention + mlp)
    kept = 0 if offload else (math.ceil(n_layers / span) + span - 1) * h
    return kept + attention + (0 if chunked else mlp)


def forward_ceiling(sizes: tuple[int, int, int, int, int], loss_fraction: float) -> float:
    """Elements per token a forward without grad holds at most, with `loss_fraction` of its tokens carrying loss."""
    _, h, q, kv, inter = sizes
    layer = max(4 * h + 4 * q + 3 * kv, 3 * h + 3 * inter, 5 * h + inter)
    return max(layer, (2 + loss_fraction) * h, loss_fraction * LOSS_ROW_H * h)


def validation_scale(fast, loss_fraction: float, train_tokens: int) -> float:
    """How many times a training batch's tokens a validation forward of this FastLlama may take (1..MAX_SCALE):
    step_floor over forward_ceiling. `loss_fraction`: the largest share of loss tokens of one validation example;
    `train_tokens`: the run's largest training batch (whether its MLP runs in chunks)."""
    if fast.sharded:
        return 1.0
    sizes = layer_sizes(fast)
    recomputed = fast.checkpointing or fast.graphs is not None
    train = step_floor(sizes, recomputed=recomputed, offload=fast.pool is not None,
                       span=len(fast.spans[0].layers) if fast.spans else 1,
                       chunked=recomputed and chunk_rows(train_tokens, fast.layers[0].mlp_chunk) > 0)
    return min(MAX_SCALE, max(1.0, train / forward_ceiling(sizes, loss_fraction)))
