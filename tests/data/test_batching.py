"""Seeded split and length-grouped batch order: deterministic, complete, and less padding than random."""

import random

from loraforge.data.batching import batch_order, collate, split_validation
from loraforge.data.templates import IGNORE_INDEX, Tokenized


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    tr, va = split_validation(items, 0.1, seed=1)
    assert len(va) == 10 and sorted(tr + va) == items
    assert split_validation(items, 0.1, seed=1) == (tr, va)
    assert split_validation(items, 0.1, seed=2)[1] != va


def test_batch_order_covers_each_index_once_and_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    batches = batch_order(lengths, 8, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batch_order(lengths, 8, seed=3, epoch=0) == batches
    assert batch_order(lengths, 8, seed=3, epoch=1) != batches

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i:i + 8] for i in range(0, 1000, 8)]
    assert padding(batches) < 0.2 * padding(random_batches)


def test_collate_pads_right_and_masks_labels():
    items = [Tokenized([1, 2, 3], [IGNORE_INDEX, 2, 3], "a"), Tokenized([4], [4], "b")]
    b = collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
