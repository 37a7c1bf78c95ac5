"""What a run will compute, as the trainer batches it: the input of the speed estimate `train` prints.

`run_shapes` walks one epoch's batch order (data.batching, the same seed as the loop), pads each batch as
collate will (to its longest row, or to a length bucket and full rows where CUDA graphs replay), and does the
same for one validation pass (train.validation_forwards.validation_groups), so plan.run_speed prices the shapes
the GPU will actually see rather than an average example.
"""

from __future__ import annotations

from collections import Counter

from loraforge.config import RunConfig
from loraforge.data.batching import batch_order, bucket_length
from loraforge.plan.run_speed import RunShapes
from loraforge.train.loop import plan_steps
from loraforge.train.validation_forwards import validation_groups, validation_layout


def run_shapes(items: list, val_items: list, cfg: RunConfig, buckets: list[int] | None,
               cold_kernels: bool = False, val_scale: float = 1.0) -> RunShapes:
    """`items` as trained (examples, or data.packing's rows), `buckets` as train.loop pads to (None: none);
    `cold_kernels`: this machine has not compiled the fast path's kernels yet (model.fast.kernel_cache);
    `val_scale`: the validation forwards' budget multiplier (train.validation_forwards.validation_scale)."""
    tc = cfg.train
    lengths = [len(t.input_ids) for t in items]
    counts: Counter = Counter()
    for batch in batch_order(lengths, tc.batch_size, cfg.seed, 0):
        longest = max(lengths[i] for i in batch)
        if buckets:
            counts[(tc.batch_size, bucket_length(longest, buckets))] += 1
        else:
            counts[(len(batch), longest)] += 1
    per_epoch, steps = plan_steps(len(items), cfg)
    micro = min(round(per_epoch * tc.epochs), steps * tc.grad_accum)
    context = None
    if items and hasattr(items[0], "seq_lens"):   # packed: attention spans one example (varlen)
        example = [n for t in items for n in t.seq_lens]
        context = max(1, round(sum(n * n for n in example) / max(1, sum(example))))
    val_counts: Counter = Counter()
    groups, pad = validation_groups(val_items, **validation_layout(cfg, items, val_scale))
    for group in groups:   # padded as collate pads them
        longest = max(len(t.input_ids) for t in group)
        val_counts[(pad.get("rows") or len(group), bucket_length(longest, pad.get("buckets") or []))] += 1
    every = tc.intervals(steps)[0]
    evaluations = (steps // every + (steps % every != 0)) if val_items else 0
    return RunShapes(batches=tuple((r, n, c) for (r, n), c in sorted(counts.items())), real_tokens=sum(lengths),
                     epochs=micro / max(1, per_epoch), context=context,
                     val_batches=tuple((r, n, c) for (r, n), c in sorted(val_counts.items())),
                     evaluations=evaluations, graphs=bool(buckets), cold_kernels=cold_kernels)
