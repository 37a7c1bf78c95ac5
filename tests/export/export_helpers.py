"""Shared pieces of the export tests: a tiny trained run and a tiny model of another size (each made
once per session, whichever test module asks first), tiny Llama/Qwen2/Qwen3 models, and llama.cpp
helpers (logits of a GGUF file for a token sequence)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import (
    chat_rows,
    make_tiny_model,
    make_tokenizer,
    tiny_config,
    write_jsonl,
)

_CACHE: dict[str, Path] = {}


def train_tiny_run(model_dir: Path, out: Path, **lora) -> Path:
    from loraforge.config import build_config
    from loraforge.train.run import run_training

    data = write_jsonl(out.parent / f"{out.name}-train.jsonl", chat_rows())
    tree = tiny_config(model_dir, data, out, epochs=1, learning_rate=3e-2)
    tree["lora"].update(lora)
    run_training(build_config(tree))
    return out


def shared_tiny_run(tiny_model, tmp_path_factory) -> Path:
    """A finished run folder on the tiny model whose adapter changes the logits (trained once)."""
    if "run" not in _CACHE:
        _CACHE["run"] = train_tiny_run(tiny_model, tmp_path_factory.mktemp("export-run") / "run")
    return _CACHE["run"]


def shared_other_base(tmp_path_factory) -> Path:
    """A tiny Llama with hidden size 32, which the adapter of the tiny run does not fit (made once)."""
    if "other" not in _CACHE:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        path = tmp_path_factory.mktemp("other-base")
        make_tiny_model(path)
        cfg = LlamaConfig.from_pretrained(path)
        cfg.hidden_size, cfg.intermediate_size = 32, 64
        torch.manual_seed(1)
        LlamaForCausalLM(cfg).save_pretrained(path)
        _CACHE["other"] = path
    return _CACHE["other"]


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
