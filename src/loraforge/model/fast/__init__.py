"""The fast training path for Llama-family models (see llama.py); everything else uses PEFT's forward."""

from __future__ import annotations

from loraforge.model.fast.llama import FastLlama, why_not_fast

__all__ = ["FastLlama", "why_not_fast", "fast_engine"]


def fast_engine(model, mode: str, device: str, dtype, checkpointing, log=print,
                sharded: bool = False, graphs: str = "auto", mlp_chunk_tokens: int | str = "auto",
                checkpoint_every: int = 1) -> FastLlama | None:
    """The FastLlama for this PEFT model when `mode` (model.fast_path) and the model allow it, else None
    (with a message saying why, when the user asked for it or a GPU run falls back). `sharded`: the run
    will shard the model with FSDP2 (FastLlama.attach_fsdp is then called after fully_shard); `graphs`:
    model.cuda_graphs; `mlp_chunk_tokens`, `checkpoint_every`: the model section's fields of those names."""
    if mode == "off" or (mode == "auto" and device != "cuda"):
        return None
    reason = why_not_fast(model)
    if reason:
        log(f"[yellow]note:[/] training on the plain PEFT path: {reason}")
        return None
    return FastLlama(model, dtype=dtype, checkpointing=checkpointing, sharded=sharded, graphs=graphs,
                     mlp_chunk_tokens=mlp_chunk_tokens, checkpoint_every=checkpoint_every)
