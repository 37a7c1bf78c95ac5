"""A frozen input embedding kept in host memory (model.host_embedding): its table leaves the GPU, and each
batch's rows are gathered on the host and copied over, pinned and without blocking.

At Llama-3.1-8B the untied input table is 128,256 x 4,096 bf16 = 0.98 GiB, 18% of a QLoRA run's resident GPU
memory (NF4 weights 3.35 GiB, embedding + head 1.96 GiB: session 16's allocator history,
bench/results/train_e2e/s16/h100_8b_mix_memory_history.json). A step of 4,096 tokens moves 32 MiB of rows
(about 1.5 ms over PCIe, queued beside the previous step's work). LoRA never trains it, and only the lookup
reads it: the head is a separate matrix when the embedding is untied, so a tied table stays where it is.

The training loop hands the batch's ids as they were on the host (`host_ids`, see train.loop.to_device), so
the gather does not wait for the GPU; any other caller (transformers' own forward, generate) passes device
ids, which are copied back first (one host-device sync a forward: fine for decoding and evaluation).
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.config import host_embedding_refusal
from loraforge.model.adapters import base_of


class HostEmbedding(nn.Module):
    """nn.Embedding's lookup over a table in host memory. The table is a plain attribute, not a parameter or
    buffer: `model.to(device)` leaves it on the host, and the PEFT adapter (what is saved) never held it."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.table = weight.detach().to("cpu").contiguous()
        self.num_embeddings, self.embedding_dim = self.table.shape
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:   # for code that reads the shape or dtype (transformers' generate)
        return self.table

    def forward(self, input_ids: torch.Tensor, host_ids: torch.Tensor | None = None) -> torch.Tensor:
        device = input_ids.device
        ids = host_ids if host_ids is not None else input_ids.to("cpu")
        if device.type != "cuda":
            return self.table.index_select(0, ids.reshape(-1)).view(*ids.shape, -1).to(device)
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.table.dtype, pin_memory=True)
        torch.index_select(self.table, 0, ids.reshape(-1), out=rows)
        # the caching host allocator keeps `rows` from reuse until this copy has run (its event is recorded)
        return rows.to(device, non_blocking=True).view(*ids.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on the host"


def _tied(model) -> bool:
    inner = base_of(model)
    head = inner.get_output_embeddings()
    emb = inner.get_input_embeddings()
    return head is None or head.weight is emb.weight or \
        head.weight.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr()


def why_not_host(model, setting: str, device: str, quantized: bool, sharded: bool) -> str | None:
    """None when the input embedding should move to the host under model.host_embedding = `setting`, else why
    not (said to the user only when they asked for it: `on`); the rule is config.host_embedding_refusal."""
    inner = base_of(model)
    emb = inner.get_input_embeddings()
    plain = isinstance(emb, nn.Embedding)
    return host_embedding_refusal(setting, on_gpu=device == "cuda", sharded=sharded,
                                  frozen=plain and not emb.weight.requires_grad, tied=plain and _tied(model),
                                  quantized=quantized,
                                  table_bytes=emb.weight.numel() * emb.weight.element_size() if plain else 0)


def move_embedding_to_host(model) -> HostEmbedding:
    """Replace the model's input embedding with a HostEmbedding of the same table; the GPU copy is freed."""
    inner = base_of(model)
    emb = inner.get_input_embeddings()
    host = HostEmbedding(emb.weight, emb.padding_idx)
    inner.set_input_embeddings(host)
    del emb
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return host
