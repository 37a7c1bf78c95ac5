"""Shared pieces of the export tests: tiny Llama/Qwen2/Qwen3 models and llama.cpp helpers (logits of a
GGUF file for a token sequence). The session fixtures `tiny_run` and `other_base` live in tests/conftest.py."""

from __future__ import annotations

import numpy as np
from conftest import make_tokenizer


class LlamaScorer:
    """A GGUF file loaded in llama.cpp (via llama-cpp-python) that returns logits for token sequences."""

    def __init__(self, gguf_path, lora=None, n_ctx: int = 512):
        from llama_cpp import Llama

        kw = {"lora_path": str(lora)} if lora else {}
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False,
                         n_threads=2, seed=0, **kw)

    def logits(self, ids: list[int]) -> np.ndarray:
        """n_tokens x n_vocab float32 logits, the sequence evaluated from an empty context."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def close(self):
        self.llm.close()


def llama_logits(gguf_path, ids: list[int], lora=None) -> np.ndarray:
    """llama.cpp's logits (n_tokens x n_vocab) for one token sequence."""
    scorer = LlamaScorer(gguf_path, lora, n_ctx=max(64, len(ids) + 8))
    try:
        return scorer.logits(ids)
    finally:
        scorer.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def tiny(kind: str = "llama", tie: bool = True, **extra):
    """A tiny random model of `kind` (llama, qwen2, qwen3) with the ChatML test tokenizer."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tok = make_tokenizer()
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    cfg = cls[0](vocab_size=len(tok) + 9, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 bos_token_id=None, initializer_range=0.2, **extra)
    torch.manual_seed(0)
    model = cls[1](cfg).eval()
    model.config.architectures = [cls[1].__name__]
    return model, tok


def assert_same_top1(got: np.ndarray, want: np.ndarray, tie: float, what: str = "") -> None:
    """Greedy decoding picks the same token at every position: the same argmax, or (at a near-tie in the
    reference, margin under `tie`) a token the reference scores within `tie` of its best. Fails if more
    than one position in ten is such a tie, so the check cannot pass on noise alone."""
    top = want.argmax(-1)
    picked = got.argmax(-1)
    rows = np.arange(len(top))
    gap = want[rows, top] - want[rows, picked]
    assert (gap <= tie).all(), f"{what}: top-1 differs where the reference is sure (gap {gap.max():.4f})"
    ties = int((picked != top).sum())
    assert ties <= max(1, len(top) // 10), f"{what}: {ties} of {len(top)} positions pick another token"
