"""quickstart.make_splits: the held-out validation rows per intent (--val-per-intent) never overlap training,
every intent gets its share, and the default (one per intent) is the split earlier runs used."""

from collections import Counter

import pytest

from loraforge.errors import LoraforgeError
from loraforge.quickstart import make_splits, run_quickstart


@pytest.mark.parametrize("per_intent,k", [(10, 1), (10, 3), (0, 5)])
def test_validation_rows_per_intent_are_held_out(per_intent, k):
    train, val, test = make_splits(per_intent, 50, val_per_intent=k)
    assert set(Counter(r["category"] for r in val).values()) == {k} and len(val) == 77 * k
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    if per_intent:
        assert set(Counter(r["category"] for r in train).values()) == {per_intent}
    else:   # all of train.csv (10,003 rows) but the validation ones
        assert len(train) + len(val) == 10003
    assert len(test) == 50


def test_one_validation_row_per_intent_keeps_the_earlier_split():
    """The default draws the rows the quickstart drew before the option existed (per intent: per_intent + 1
    sampled, the last one held out), so earlier runs' numbers stay comparable."""
    import random
    from collections import defaultdict

    from loraforge.quickstart import SEED, banking77_rows

    by_label = defaultdict(list)
    for row in banking77_rows("train"):
        by_label[row["category"]].append(row)
    rng, train_old, val_old = random.Random(SEED), [], []
    for label in sorted(by_label):
        rows = rng.sample(by_label[label], 11)
        val_old.append(rows.pop())
        train_old += rows
    rng.shuffle(train_old)
    train, val, _ = make_splits(10, 300)
    assert [r["text"] for r in val] == [r["text"] for r in val_old]
    assert [r["text"] for r in train] == [r["text"] for r in train_old]


def test_bad_val_per_intent_is_refused(tmp_path):
    with pytest.raises(LoraforgeError, match="--val-per-intent"):
        run_quickstart(tmp_path / "run", val_per_intent=0)
