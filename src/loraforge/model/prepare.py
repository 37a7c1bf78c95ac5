"""A loaded base model made ready to train, as the config says: a fresh PEFT adapter, the fast
Llama-family forward where it applies (model.fast), else transformers' own gradient checkpointing.
The trainer and the benchmarks call this one function, so they measure what `loraforge train` runs."""

from __future__ import annotations

from loraforge.config import RunConfig
from loraforge.model.adapters import attach_adapter
from loraforge.model.fast import FastLlama, fast_engine
from loraforge.model.host_embedding import move_embedding_to_host, why_not_host


def prepare_for_training(model, cfg: RunConfig, device: str, compute_dtype, *, base_path: str | None = None,
                         fast_path: str | None = None, sharded: bool = False,
                         log=print) -> tuple[object, FastLlama | None]:
    """(PEFT model, FastLlama or None). `fast_path` overrides cfg.model.fast_path; `sharded`: FSDP2 will
    shard the model (the trainer then attaches the FastLlama to FSDP2's groups)."""
    model = attach_adapter(model, cfg.lora, base_path)
    why = why_not_host(model, cfg.model.host_embedding, device, cfg.model.quantization == "nf4", sharded)
    if why is None:
        move_embedding_to_host(model)
    elif cfg.model.host_embedding == "on":
        log(f"[yellow]note:[/] the input embedding stays on the GPU: {why}")
    ckpt = cfg.model.gradient_checkpointing
    fast = fast_engine(model, fast_path or cfg.model.fast_path, device, compute_dtype, ckpt, log=log,
                       sharded=sharded, graphs=cfg.model.cuda_graphs, mlp_chunk_tokens=cfg.model.mlp_chunk_tokens,
                       checkpoint_every=cfg.model.checkpoint_every)
    if ckpt and fast is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, fast
