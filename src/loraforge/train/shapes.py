"""What a run will compute, as the trainer batches it: the input of the speed estimate `train` prints.

`run_shapes` walks one epoch's batch order (data.batching, the same seed as the loop), pads each batch as
collate will (to its longest row, or to a length bucket and full rows where CUDA graphs replay), and does the
same for one validation pass (train.loop.validation_batches), so plan.run_speed prices the shapes the GPU
will actually see rather than an average example.
"""

from __future__ import annotations

from collections import Counter

from loraforge.config import RunConfig
from loraforge.data.batching import batch_order, bucket_length
from loraforge.plan.run_speed import RunShapes
from loraforge.train.loop import plan_steps, validation_batches, validation_rows


def run_shapes(items: list, val_items: list, cfg: RunConfig, buckets: list[int] | None) -> RunShapes:
    """`items` as trained (examples, or data.packing's rows), `buckets` as train.loop pads to (None: none)."""
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
    if cfg.data.packing and val_items:   # rows of max_seq_length, batch_size a forward (train.loop.evaluate_loss)
        val_counts[(tc.batch_size, -(-cfg.data.max_seq_length // 16) * 16)] = \
            -(-len(validation_rows(val_items, cfg.data.max_seq_length)) // tc.batch_size)
    else:
        val_lengths = [len(t.input_ids) for t in val_items]
        for batch in validation_batches(val_lengths, tc.batch_size):
            val_counts[(len(batch), max(val_lengths[i] for i in batch))] += 1
    evaluations = (steps // tc.eval_every + (steps % tc.eval_every != 0)) if val_items else 0
    return RunShapes(batches=tuple((r, n, c) for (r, n), c in sorted(counts.items())), real_tokens=sum(lengths),
                     epochs=micro / max(1, per_epoch), context=context,
                     val_batches=tuple((r, n, c) for (r, n), c in sorted(val_counts.items())),
                     evaluations=evaluations, graphs=bool(buckets))
