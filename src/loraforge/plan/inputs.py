"""What to plan: a model shape, a training setup and a dataset size, from a RunConfig plus explicit changes.

    from loraforge.config import load_config
    inputs = from_config(load_config("run.yaml"), method="qlora", seq=4096)

Config fields map as: model.quantization nf4 -> qlora (else lora), lora.r/target_modules/dropout,
train.batch_size/grad_accum/optimizer/epochs, data.max_seq_length, model.gradient_checkpointing, and the
sharding strategy from train.distributed when the config has it (the GPU count is a flag: `--gpus`), and the
objective: `objective`, grpo.group_size -> generations, grpo.max_new_tokens -> completion, a reference forward
for dpo/kto and for grpo with grpo.kl_beta > 0. A row is seq tokens: one side of a pair (each side fits
max_seq_length) or GRPO's prompt + completion (`prompt_length` sets seq = prompt_length + completion).
The dataset size is counted from `data.train` when it is a local JSONL/CSV file (examples = rows, tokens ~
bytes / 4; a pair's record counts as two sides of half its size each, a rough guess), else assumed (1,000
examples of 512 tokens) and marked as assumed in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import LoraforgeError
from loraforge.plan.memory import TrainSetup
from loraforge.plan.shapes import ModelShape, resolve_shape
from loraforge.plan.throughput import DataSize

if TYPE_CHECKING:
    from loraforge.config import RunConfig

BYTES_PER_TOKEN = 4  # rough English text in a BPE vocabulary; JSON keys and quoting make it an over-estimate
_COUNT_CHUNK = 1 << 20


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    setup: TrainSetup
    data: DataSize
    reference_live: bool = False  # preference.reference: live (the reference forward every epoch, not once)
    eval_every: int | None = None  # train.eval_every when a number (None: auto, config.auto_every)


def count_dataset(path: str | Path) -> DataSize | None:
    """Examples and rough tokens per example of a local .jsonl/.csv file; None for other files."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".csv") or not p.is_file():
        return None
    lines, size, last = 0, 0, b"\n"
    with p.open("rb") as f:
        while chunk := f.read(_COUNT_CHUNK):
            lines, size, last = lines + chunk.count(b"\n"), size + len(chunk), chunk[-1:]
    examples = lines + (last != b"\n") - (p.suffix.lower() == ".csv")  # unterminated last line; CSV header
    if examples < 1:
        return None
    return DataSize(examples=examples, avg_tokens=max(1, math.ceil(size / examples / BYTES_PER_TOKEN)),
                    assumed=False)


def _strategy(cfg: RunConfig) -> str:
    """'fsdp' when the config's train.distributed (a name, or a section with `strategy`) says so, else 'ddp'."""
    dist = getattr(cfg.train, "distributed", None)
    name = getattr(dist, "strategy", dist)
    return "fsdp" if isinstance(name, str) and name.lower().startswith("fsdp") else "ddp"


def setup_from_config(cfg: RunConfig, shape: ModelShape | None = None, **changes: Any) -> TrainSetup:
    """The TrainSetup a run config trains with on a GPU; keyword `changes` (TrainSetup fields) replace its values.

    The trainer's fast path (model.fast_path auto/on) is assumed for the families it runs (`shape`'s family;
    any family when no shape is given).
    """
    ckpt = getattr(cfg.model, "gradient_checkpointing", False)
    objective = changes.get("objective", cfg.objective)
    fast = getattr(cfg.model, "fast_path", "off") != "off" and (shape is None or shape.fast_path_capable)
    setup = TrainSetup(
        method="qlora" if cfg.model.quantization == "nf4" else "lora",
        seq=cfg.data.max_seq_length, batch=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
        rank=cfg.lora.r, targets=tuple(cfg.lora.target_modules), lora_dropout=cfg.lora.dropout,
        gradient_checkpointing=bool(ckpt), optimizer=cfg.train.optimizer, host_embedding=cfg.model.host_embedding,
        packing=cfg.data.packing,
        strategy=_strategy(cfg), fast_path=fast, offload_checkpoints=fast and ckpt == "offload",
        mlp_chunk_tokens=cfg.model.mlp_chunk_tokens, checkpoint_every=cfg.model.checkpoint_every,
        objective=objective, generations=cfg.grpo.group_size, completion=cfg.grpo.max_new_tokens,
        reference=cfg.grpo.kl_beta > 0 if objective == "grpo" else None,  # grpo's reference comes with its KL
    )
    return replace(setup, **changes) if changes else setup


def from_config(cfg: RunConfig, **flags: Any) -> PlanInputs:
    """Inputs for `cfg`, with each flag that is not None replacing the config's value.

    Flags: model, method, seq, batch, grad_accum, rank, targets, gradient_checkpointing, optimizer, packing,
    offload, gpus, strategy, objective, generations, completion, prompt_length, examples, epochs, avg_tokens.
    """
    unknown = set(flags) - {*TrainSetup.__dataclass_fields__, "model", "examples", "epochs", "avg_tokens",
                            "prompt_length"}
    if unknown:
        raise TypeError(f"unknown plan flags: {sorted(unknown)}")
    given = {k: v for k, v in flags.items() if v is not None}
    shape = resolve_shape(given.get("model") or cfg.base_model)
    setup = setup_from_config(cfg, shape, **{k: v for k, v in given.items() if k in TrainSetup.__dataclass_fields__})
    setup = _objective_lengths(setup, given.get("prompt_length"), "seq" in given)
    counted = count_dataset(cfg.data.train) if cfg.data.train else None
    if counted and setup.rows == 2:  # a record holds the prompt once and both completions
        counted = replace(counted, avg_tokens=max(1, math.ceil(counted.avg_tokens / 2)))
    data = counted or DataSize(avg_tokens=min(DataSize.avg_tokens, setup.seq))
    data = replace(data, epochs=cfg.train.epochs)
    sizes = {k: given[k] for k in ("examples", "epochs", "avg_tokens") if k in given}
    for name, value in sizes.items():
        if value <= 0 or (name != "epochs" and int(value) != value):
            raise LoraforgeError(f"{name} must be a positive {'number' if name == 'epochs' else 'whole number'}"
                                 f" (got {value!r})")
    if sizes:
        data = replace(data, **sizes, assumed=data.assumed and not {"examples", "avg_tokens"} <= set(sizes))
    every = cfg.train.eval_every
    return PlanInputs(shape, setup, data, cfg.preference.reference == "live", None if every == "auto" else every)


def _objective_lengths(setup: TrainSetup, prompt_length: int | None, seq_given: bool) -> TrainSetup:
    """GRPO's row is prompt + completion: --prompt-length sets seq; a seq with no room for a prompt is an error."""
    if prompt_length is not None:
        if setup.objective != "grpo":
            raise LoraforgeError("--prompt-length is for objective grpo",
                                 hint="for other objectives --seq is one row (a side of a pair, prompt included)")
        if prompt_length < 1:
            raise LoraforgeError(f"prompt_length must be a whole number of at least 1 (got {prompt_length!r})")
        return replace(setup, seq=prompt_length + setup.completion)
    if setup.objective == "grpo" and setup.seq <= setup.completion:
        where = "--seq" if seq_given else "data.max_seq_length"
        raise LoraforgeError(f"{where} {setup.seq} leaves no room for a prompt before a completion of "
                             f"{setup.completion} tokens", hint="raise it, or lower --completion "
                             "(grpo.max_new_tokens), or give --prompt-length")
    return setup
