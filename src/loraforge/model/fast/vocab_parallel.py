"""The input embedding and the output head over their FSDP2 shards, never gathered whole.

Under FSDP2 an untied embedding and lm_head are groups of their own (train.distributed.edge_modules),
each rank holding a slice of their vocabulary rows. Gathering them for use costs a full vocab x hidden
matrix per GPU twice over (FSDP2's staging buffer and the unsharded parameter): for Llama-3.1-8B 2 GiB
at the moment of the loss, more than a quarter of a QLoRA run's peak on 2 GPUs (bench/results/multi_gpu/).
The token-side data is small instead, so it moves rather than the weights ("vocabulary parallel", as in
Megatron-LM's tensor parallel loss, here across the data-parallel ranks):

- embedding: every rank gathers all ranks' token ids, looks up the ones in its vocabulary slice (zeros
  elsewhere), and a reduce-scatter hands each rank the rows of its own tokens (one rank wrote each row,
  so the sum is exact);
- loss: every rank gathers all ranks' hidden states and labels, computes the logits of its vocabulary
  slice in chunks, and the log-sum-exp and the target logit of each token are combined across ranks; the
  gradient of the hidden states is computed in the same pass over the chunks (the slice's softmax, rescaled
  once the global log-sum-exp is known) and reduce-scattered to the token owners, so backward only scales it.

Both weights are frozen here (LoRA does not train them); every rank must call these the same number of
times (the trainer's micro-batch schedule guarantees it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from loraforge.data.templates import IGNORE_INDEX


def is_row_sharded(weight) -> bool:
    """True for a DTensor parameter sharded on dim 0 over one mesh dimension (FSDP2's layout)."""
    placements = getattr(weight, "placements", None)
    return placements is not None and len(placements) == 1 and placements[0].is_shard(0)


def _shard(weight):
    """(local rows, first row's vocabulary id, process group, world size, rank) of a row-sharded weight."""
    group = weight.device_mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per_rank = -(-weight.shape[0] // world)   # FSDP2 chunks dim 0 as torch.chunk does
    return weight.to_local(), rank * per_rank, group, world, rank


def _padded_gather(x: torch.Tensor, group, world: int, fill, n_max: int | None = None) -> tuple[torch.Tensor, int]:
    """All ranks' `x` (rows padded to the longest rank's count with `fill`), and that count (found with one
    all-reduce and a host sync unless given)."""
    if n_max is None:
        n = torch.tensor([x.shape[0]], device=x.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        n_max = int(n.item())
    if x.shape[0] < n_max:
        pad = x.new_full((n_max - x.shape[0], *x.shape[1:]), fill)
        x = torch.cat([x, pad])
    out = x.new_empty((world * n_max, *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out, n_max


def vocab_parallel_embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    """embedding(ids) over a row-sharded frozen weight: (*ids.shape, hidden)."""
    local, row0, group, world, rank = _shard(weight)
    flat = ids.reshape(-1)
    every, n_max = _padded_gather(flat, group, world, -1)
    rel = every - row0
    hit = (rel >= 0) & (rel < local.shape[0])
    rows = F.embedding(rel.clamp(0, max(local.shape[0] - 1, 0)), local) if local.shape[0] else \
        local.new_zeros(every.shape[0], weight.shape[1])
    rows = rows * hit.unsqueeze(1).to(rows.dtype)
    own_rows = rows.new_empty(n_max, rows.shape[1])   # this rank's ids' rows, summed over every rank's shard
    dist.reduce_scatter_tensor(own_rows, rows, group=group)
    return own_rows[:flat.shape[0]].view(*ids.shape, -1)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, labels, local, row0, group, world, rank, chunk):
        n = hidden.shape[0]
        every_h, n_max = _padded_gather(hidden, group, world, 0)
        every_y, _ = _padded_gather(labels, group, world, IGNORE_INDEX, n_max)
        rows = local.shape[0]
        rel = (every_y - row0).clamp(0, max(rows - 1, 0)).unsqueeze(1)
        hit = (every_y >= row0) & (every_y < row0 + rows)
        total = every_h.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)   # fp32 sums for 16-bit inputs
        lse = torch.full((total,), float("-inf"), device=hidden.device, dtype=acc)
        target = torch.zeros(total, device=hidden.device, dtype=acc)
        want_grad = ctx.needs_input_grad[0]
        # with the gradient: softmax over this rank's slice times its rows, rescaled below once the
        # log-sum-exp over the whole vocabulary is known (one pass over the logits, not two)
        grad = torch.zeros(total, hidden.shape[1], device=hidden.device, dtype=acc) if want_grad else None
        for start in range(0, total if rows else 0, chunk):
            end = start + chunk
            logits = (every_h[start:end] @ local.t()).to(acc)
            lse[start:end] = torch.logsumexp(logits, dim=1)
            target[start:end] = torch.where(hit[start:end], logits.gather(1, rel[start:end]).squeeze(1), 0.0)
            if want_grad:
                p = logits.sub_(lse[start:end, None]).exp_()
                grad[start:end] = (p.to(local.dtype) @ local).to(acc)
        lses = lse.new_empty(world * total)
        dist.all_gather_into_tensor(lses, lse, group=group)
        whole = torch.logsumexp(lses.view(world, total), dim=0)     # over the whole vocabulary
        dist.all_reduce(target, group=group)                          # each label's logit, from its owner
        valid = every_y != IGNORE_INDEX
        losses = torch.where(valid, whole - target, 0.0)
        own_loss = losses[rank * n_max:rank * n_max + n].sum()   # this rank's rows only
        if want_grad:
            # d loss / d h = sum_v softmax_v w_v - w_label: this slice's softmax share is exp(lse - whole)
            grad.mul_(torch.exp(lse - whole).unsqueeze(1))
            if rows:
                grad.sub_(F.embedding(rel.squeeze(1), local).to(acc) * hit.unsqueeze(1))
            grad.mul_(valid.unsqueeze(1))
            own = grad.new_empty(n_max, hidden.shape[1])
            dist.reduce_scatter_tensor(own, grad, group=group)
            ctx.save_for_backward(own[:n].to(hidden.dtype))
        return own_loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None, None, None, None


def vocab_parallel_ce_sum(hidden: torch.Tensor, weight, labels: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight^T, labels_i) over this rank's rows `hidden` (N, H), with `weight` a frozen
    row-sharded (vocab, H) head; differentiable in `hidden`. `chunk` tokens' logits at a time: by default as
    many as keep one chunk's logits at 2^25 numbers (128 MiB in fp32; ~1/4 of a GiB with its bf16 product)."""
    local, row0, group, world, rank = _shard(weight)
    chunk = chunk or max(1, (1 << 25) // max(local.shape[0], 1))
    return _VocabParallelCE.apply(hidden, labels, local.to(hidden.dtype), row0, group, world, rank, chunk)
