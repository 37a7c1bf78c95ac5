"""The fast path's shared run state: one FastState per FastLlama, handed to every layer and projection.

FastLlama (model.fast.llama) creates it and writes the per-pass fields before each forward; the projections
(model.fast.lora) and the chunked MLP (model.fast.chunked) read them. Its identity never changes for the
life of the FastLlama: the projections hold a reference to it, and the dropout seed tensor a CUDA graph
reads (model.fast.graphs) is the one kept here. A slotted dataclass, so each read in hot code is one
attribute access (what a dict lookup by string key was before).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True, eq=False)
class FastState:
    """What the layers and projections of one fast model share between calls."""

    # in x out of the model's largest single projection: an NF4 group larger than this is rebuilt one
    # projection at a time, so the rebuild buffer stays one weight's size (lora.FrozenGroup.split)
    largest: float = float("inf")
    # the one-element int64 tensor the LoRA dropout masks are drawn from (model.fast.dropout); refilled in
    # place before each training forward, so a graph's replay reads the new seed from the same address
    dropout_seed: torch.Tensor | None = None
    # bumped by FastLlama.hidden before each forward: a forward, its recomputation and its backward share one
    # number, so cached per-pass products (lora._stack, lora._thin_product) know when they are stale
    forward_pass: int = 0
    # whether the forward without grad keeps x A^T for the recomputation (lora._thin_product): set by
    # FastLlama.hidden for checkpointed or graphed training passes, off inside the chunked MLP
    keep_xa: bool = False
    # the first row of the current chunk of tokens in the chunked MLP (model.fast.chunked), 0 elsewhere: each
    # chunk draws dropout masks from a stream of its own
    dropout_rows: int = 0
    # (group id, members, dtype) of the weights the NF4 rebuild buffer holds now, or None; cleared at the start
    # of every decoder layer (lora.FrozenGroup._rebuild)
    rebuilt: tuple | None = None
    # the NF4 rebuild buffers, one flat tensor per dequantised dtype, shared by every projection of the model
    rebuild_buffers: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    # set by model.fast.decode while it generates: NF4 products of a few rows then read the packed weight
    # (model.fast.nf4_matmul) instead of rebuilding it
    decoding: bool = False
    # set when that packed product failed to build (lora.FrozenGroup.add_product_ warned): rebuild from then on
    packed_failed: bool = False
