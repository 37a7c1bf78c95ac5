"""Seeded train/validation split, stratified by label, with duplicates kept on one side.

    report = split_file("data.jsonl", "train.jsonl", "validation.jsonl", fraction=0.1, seed=3407)

Exact duplicates (and, with `near_threshold`, MinHash near-duplicates) form groups that go to one
side together, so no example or near-copy of it is both trained on and validated on; the split is
then checked independently (`leaks_exact`, `leaks_near` must be 0). When the data has a label (a
`label` field, a mapped response column, or a final answer from a small set, as in intent
classification) the validation share is taken per label, so both sides keep its distribution.
The same seed and file give the same split. With `dedup=True` exact duplicates are dropped instead
of grouped: one streaming pass then validates, deduplicates and splits (the fast path for big files).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loraforge.data.dedup import NearIndex, removed_line, similarity_text
from loraforge.data.formats import ReadOptions, categorical
from loraforge.data.scan import KEY, default_workers, scan
from loraforge.data.sinks import JsonlSink, Spool, sibling
from loraforge.data.validate import Tally
from loraforge.errors import LoraforgeError

MAX_LABELS = 10_000


@dataclass
class SplitReport:
    input: Tally
    fraction: float
    seed: int
    stratified: bool
    removed: int = 0                 # exact duplicates dropped (with dedup=True)
    removed_path: str | None = None
    train: int = 0
    validation: int = 0
    grouped: int = 0                 # records placed with a duplicate of theirs
    leaks_exact: int = 0
    leaks_near: int | None = None    # None: not checked
    labels: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (train, validation)
    train_path: str | None = None
    validation_path: str | None = None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["input"] = self.input.to_dict()
        d["labels"] = {k: list(v) for k, v in self.labels.items()}
        return d


class _Groups:
    """Union-find over record indices, started from given roots; a group's root is its first record."""

    def __init__(self, roots):
        self.parent = array("q", roots.tolist())

    def root(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def roots(self):
        """The root of every index, as a numpy array (pointer jumping, vectorised)."""
        parent = np.frombuffer(self.parent, dtype=np.int64).copy()
        while True:
            grand = parent[parent]
            if (grand == parent).all():
                return parent
            parent = grand

    def union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def assign(roots, labels, n_labels: int, fraction: float, seed: int, stratified: bool):
    """A boolean array: True where a record goes to validation. Whole groups move together."""
    roots = np.asarray(roots, dtype=np.int64)
    n = len(roots)
    group_ids, first, sizes = np.unique(roots, return_index=True, return_counts=True)
    group_label = np.asarray(labels, dtype=np.int64)[first] if stratified else np.zeros(len(group_ids), np.int64)
    val_group = np.zeros(len(group_ids), dtype=bool)
    for lab in range(n_labels if stratified else 1):
        members = np.flatnonzero(group_label == lab)
        total = int(sizes[members].sum())
        target = round(total * fraction)
        if not stratified and n >= 2 and fraction > 0:
            target = max(1, target)
        if target == 0 or total < 2:
            continue
        taken = 0
        for g in members[np.random.RandomState([seed % 2**32, lab]).permutation(len(members))].tolist():
            if taken + sizes[g] <= target:  # a group too big for what is left is skipped, not cut
                val_group[g] = True
                taken += int(sizes[g])
                if taken == target:
                    break
    return val_group[np.searchsorted(group_ids, roots)]


def split_file(path: str | Path, train_out: str | Path, validation_out: str | Path, *, fraction: float = 0.1,
               seed: int = 3407, stratify: str = "auto", near_threshold: float | None = 0.8,
               opts: ReadOptions = ReadOptions(), rejects: str | Path | None = None, dedup: bool = False,
               removed: str | Path | None = None, workers: int | None = None) -> SplitReport:
    """Split `path` into train/validation files; see the module docstring. stratify: auto|yes|no.
    dedup=True also drops exact duplicates (first kept, the others written to `removed`), so one
    streaming pass validates, deduplicates and splits. `workers` (default: the CPUs) read big JSONL
    files in parallel when there is no near-duplicate search."""
    if not 0 < fraction < 1:
        raise LoraforgeError(f"the validation fraction must be between 0 and 1, got {fraction}")
    if stratify not in ("auto", "yes", "no"):
        raise LoraforgeError(f"stratify must be auto, yes or no, got {stratify!r}")
    tally = Tally(str(path))
    keys, labels, sources, sigs = bytearray(), [], [], []
    near = NearIndex(near_threshold) if near_threshold else None
    with JsonlSink(rejects or sibling(train_out, "rejects"), inputs=(path,), lazy=True) as rej, \
            Spool(train_out) as spool:
        for part in scan(path, opts, tally, rej, spool, keep_examples=near is not None,
                         workers=default_workers() if workers is None else workers):
            keys += part.keys
            labels += part.labels
            sources += part.sources
            if near is not None:
                sigs += [near.signature(similarity_text(ex)) for ex in part.examples]
        tally.require_valid()
        key_arr = np.frombuffer(bytes(keys), dtype=f"V{KEY}")
        _, first, inverse = np.unique(key_arr, return_index=True, return_inverse=True)
        first_of = first[inverse.reshape(-1)]            # each record -> the first record with its key
        is_first = first_of == np.arange(len(key_arr))
        kept = np.flatnonzero(is_first) if dedup else np.arange(len(key_arr))
        position = np.cumsum(is_first) - 1 if dedup else np.arange(len(key_arr))  # record -> index in kept
        groups = _Groups(position[first_of[kept]])       # exact duplicates start in one group
        if near is not None:  # near duplicates join, judged on first occurrences in file order
            for i, r in enumerate(kept.tolist()):
                if is_first[r]:
                    for k, _ in near.query(sigs[r]):
                        groups.union(i, k)
                    near.insert(i, sigs[r])
        n = len(kept)
        names: dict[str, int] = {}
        label_ids = array("i", [names.setdefault(labels[r], len(names)) for r in kept.tolist()])
        if stratify == "yes" and len(names) > MAX_LABELS:
            raise LoraforgeError(f"cannot stratify: the data has more than {MAX_LABELS} distinct labels")
        stratified = stratify == "yes" or (stratify == "auto" and len(names) <= MAX_LABELS
                                           and categorical(len(names), n, tally.labelled > 0))
        roots = groups.roots()
        to_val = assign(roots, label_ids, len(names), fraction, seed, stratified)
        status = np.full(len(key_arr), 2, dtype=np.int8)  # 2: removed as an exact duplicate
        status[kept] = to_val
        report = SplitReport(tally, fraction, seed, stratified, grouped=n - len(np.unique(roots)),
                             removed=len(key_arr) - n)
        with JsonlSink(train_out, inputs=(path,)) as tr, JsonlSink(validation_out, inputs=(path, train_out)) as va, \
                JsonlSink(removed or sibling(train_out, "removed"), inputs=(path,), lazy=True) as gone:
            sinks = (tr, va)
            for r, (line, st) in enumerate(zip(spool.lines(), status.tolist())):
                if st == 2:
                    gone.write(removed_line(sources[r], "exact", 1.0, sources[first_of[r]], line))
                else:
                    sinks[st].write(line)
    report.removed_path = str(gone.path) if gone.written else None
    report.train, report.validation = tr.count, va.count
    report.train_path, report.validation_path = str(train_out), str(validation_out)
    kept_keys = key_arr[kept]
    report.leaks_exact = int(np.isin(kept_keys[to_val], kept_keys[~to_val]).sum())
    if near is not None:
        report.leaks_near = _near_leaks(near, to_val)
    if stratified:
        counts = np.bincount(np.frombuffer(label_ids, dtype=np.int32) * 2 + to_val, minlength=2 * len(names))
        report.labels = {name: (int(counts[2 * lab]), int(counts[2 * lab + 1])) for name, lab in sorted(names.items())}
    return report


def _near_leaks(near: NearIndex, to_val) -> int:
    """Validation records with a near-duplicate on the train side, searched afresh."""
    check = NearIndex(near.threshold, near.num_perm)
    for i, sig in near.sigs.items():
        if not to_val[i]:
            check.insert(i, sig)
    return sum(1 for i, sig in near.sigs.items() if to_val[i] and check.query(sig))
