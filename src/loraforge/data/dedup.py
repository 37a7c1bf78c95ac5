"""Find and remove duplicate examples: exact, near-duplicate (MinHash LSH) and semantic.

    report = dedup_file("train.jsonl", "dedup.jsonl", removed="removed.jsonl", methods=("exact", "near"))

  exact     the same conversation after normalising text (Unicode NFKC, case, whitespace): a hash
  near      MinHash (datasketch) over character 5-grams of the user/assistant text, LSH candidates,
            kept when the estimated Jaccard similarity reaches `threshold` (0.8)
  semantic  sentence embeddings (all-MiniLM-L6-v2, see semantic.py) with cosine >= `semantic_threshold`
Records are judged in file order and the first of each cluster is kept, so the result is
deterministic. System turns are left out of the near/semantic text: a prompt shared by every record
would make them all look alike. Removed records go to `removed` with the method, the similarity
and the record they duplicate; invalid records to rejects, as `data validate` would report them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loraforge.data.formats import Example, ReadOptions, to_record
from loraforge.data.readers import dumps
from loraforge.data.semantic import semantic_duplicates
from loraforge.data.sinks import JsonlSink, Spool, sibling
from loraforge.data.validate import Tally, iter_valid
from loraforge.errors import LoraforgeError

METHODS = ("exact", "near", "semantic")
SHINGLE = 5
_PUNCT = re.compile(r"[^\w\s]")


def normalise_text(text: str) -> str:
    """Text as compared for duplicates: NFKC, case-folded, whitespace collapsed."""
    if not text.isascii():  # ASCII is already NFKC
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split())


def exact_key(example: Example) -> bytes:
    """A 16-byte hash of the whole normalised conversation (roles included)."""
    # Separators stand alone between spaces, so whitespace at a turn's edges is collapsed like any other.
    text = normalise_text(" \x00 ".join(t["role"] + " \x01 " + t["content"] for t in example.messages))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def similarity_text(example: Example) -> str:
    """The text near/semantic duplicates are judged on: every non-system turn, in order."""
    return "\n".join(t["content"] for t in example.messages if t["role"] != "system")


class NearIndex:
    """MinHash LSH (datasketch) over character 5-grams: `signature`, then `query` and `insert`."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise LoraforgeError("near-duplicate search needs datasketch", hint="pip install datasketch") from None
        if not 0 < threshold <= 1:
            raise LoraforgeError(f"the Jaccard threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm = threshold, num_perm
        self._minhash = MinHash
        self._perms = MinHash(num_perm=num_perm).permutations
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs: dict = {}

    def signature(self, text: str):
        chars = np.frombuffer(_PUNCT.sub("", normalise_text(text)).encode("utf-32-le"), dtype=np.uint32)
        chars = chars.astype(np.uint64)
        n = len(chars) - SHINGLE + 1
        if n < 1:  # shorter than one shingle: the whole text is the shingle
            grams = np.array([int(chars.sum()) + len(chars)], dtype=np.uint64)
        else:
            grams = np.zeros(n, dtype=np.uint64)
            for j in range(SHINGLE):  # a polynomial rolling hash, wrapping in 64 bits
                grams = grams * np.uint64(1_000_003) + chars[j:n + j]
            grams ^= grams >> np.uint64(29)
        m = self._minhash(num_perm=self.num_perm, hashfunc=int, permutations=self._perms, scheme="affine32")
        m.update_batch(np.unique(grams & np.uint64(0xFFFFFFFF)).tolist())
        return m

    def query(self, sig) -> list[tuple[object, float]]:
        """Indexed keys whose estimated Jaccard with `sig` reaches the threshold, most similar first."""
        hits = [(k, sig.jaccard(self.sigs[k])) for k in self.lsh.query(sig)]
        return sorted(((k, j) for k, j in hits if j >= self.threshold), key=lambda kv: (-kv[1], kv[0]))

    def insert(self, key, sig) -> None:
        from datasketch import LeanMinHash

        lean = LeanMinHash(sig)
        self.lsh.insert(key, lean, check_duplication=False)
        self.sigs[key] = lean


@dataclass
class Cluster:
    kept: str                                              # where the kept record is
    removed: list[tuple[str, str, float]] = field(default_factory=list)  # (where, method, similarity)


@dataclass
class DedupReport:
    input: Tally
    methods: tuple[str, ...]
    threshold: float
    semantic_threshold: float
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # method -> count
    clusters: list[Cluster] = field(default_factory=list)  # largest first
    out_path: str | None = None
    removed_path: str | None = None

    def to_dict(self) -> dict:
        return {"input": self.input.to_dict(), "methods": list(self.methods), "threshold": self.threshold,
                "semantic_threshold": self.semantic_threshold, "kept": self.kept, "removed": self.removed,
                "clusters": len(self.clusters), "out_path": self.out_path, "removed_path": self.removed_path,
                "largest_clusters": [{"kept": c.kept, "removed": [list(r) for r in c.removed]}
                                     for c in self.clusters[:20]]}


def find_duplicates(examples: Iterable[Example], methods: tuple[str, ...] = ("exact", "near"),
                    threshold: float = 0.8, semantic_threshold: float = 0.9, embed: Callable | None = None,
                    on_example: Callable[[Example], None] | None = None) -> tuple[list[str], dict]:
    """(sources of all examples, {index: (index kept instead, method, similarity)}), greedily in order."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise LoraforgeError(f"unknown dedup method {bad or methods}; use {', '.join(METHODS)}")
    sources: list[str] = []
    dup_of: dict[int, tuple[int, str, float]] = {}
    seen: dict[bytes, int] = {}
    near = NearIndex(threshold) if "near" in methods else None
    survivors: list[tuple[int, str]] = []
    for i, ex in enumerate(examples):
        sources.append(ex.source)
        if on_example is not None:
            on_example(ex)
        if "exact" in methods:
            first = seen.setdefault(exact_key(ex), i)
            if first != i:
                dup_of[i] = (first, "exact", 1.0)
                continue
        if near is not None:
            sig = near.signature(similarity_text(ex))
            hits = near.query(sig)
            if hits:
                dup_of[i] = (hits[0][0], "near", round(hits[0][1], 3))
                continue
            near.insert(i, sig)
        if "semantic" in methods:
            survivors.append((i, similarity_text(ex)))
    if survivors:
        index = [i for i, _ in survivors]
        for k, (j, score) in semantic_duplicates([t for _, t in survivors], semantic_threshold, embed).items():
            dup_of[index[k]] = (index[j], "semantic", round(score, 3))
    return sources, dup_of


def clusters_of(sources: list[str], dup_of: dict) -> list[Cluster]:
    """Duplicate clusters, each under the record kept for it, largest first."""
    by_kept: dict[int, Cluster] = {}
    for i in sorted(dup_of):
        j, method, score = dup_of[i]
        by_kept.setdefault(j, Cluster(sources[j])).removed.append((sources[i], method, score))
    return sorted(by_kept.values(), key=lambda c: -len(c.removed))


def removed_line(where: str, method: str, similarity: float, duplicate_of: str, record_json: str) -> str:
    """A removed-file line: which record went, by which method, and which record it duplicates."""
    return (f'{{"where":{dumps(where)},"method":"{method}","similarity":{similarity},'
            f'"duplicate_of":{dumps(duplicate_of)},"record":{record_json}}}')


def dedup_file(path: str | Path, out: str | Path, *, removed: str | Path | None = None,
               rejects: str | Path | None = None, opts: ReadOptions = ReadOptions(),
               methods: tuple[str, ...] = ("exact", "near"), threshold: float = 0.8,
               semantic_threshold: float = 0.9, embed: Callable | None = None) -> DedupReport:
    """Write the file without its duplicates to `out`; see the module docstring."""
    out = Path(out)
    removed = Path(removed) if removed else sibling(out, "removed")
    tally = Tally(str(path))
    with JsonlSink(rejects or sibling(out, "rejects"), inputs=(path,), lazy=True) as rej, Spool(out) as spool:
        sources, dup_of = find_duplicates(iter_valid(path, opts, tally, rej), methods, threshold,
                                          semantic_threshold, embed, on_example=lambda ex: spool.add(to_record(ex)))
        tally.require_valid()
        with JsonlSink(out, inputs=(path,)) as kept, JsonlSink(removed, inputs=(path,), lazy=True) as gone:
            for i, line in enumerate(spool.lines()):
                if i in dup_of:
                    j, method, score = dup_of[i]
                    gone.write(removed_line(sources[i], method, score, sources[j], line))
                else:
                    kept.write(line)
    report = DedupReport(tally, tuple(methods), threshold, semantic_threshold, kept=kept.count,
                         clusters=clusters_of(sources, dup_of), out_path=str(out),
                         removed_path=str(removed) if gone.written else None)
    for _, method, _ in dup_of.values():
        report.removed[method] = report.removed.get(method, 0) + 1
    return report
