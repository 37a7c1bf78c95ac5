"""LoRA / DoRA adapters through PEFT, so that every tool that reads PEFT folders loads ours.

attach_adapter: wrap a frozen base with a fresh adapter (targets checked against the model; its dropout
                modules made MaskDropout, cheaper on CPU);
save_adapter:   adapter_config.json + adapter_model.safetensors (+ tokenizer) written atomically;
load_adapter:   a saved adapter over a base model, for inference or evaluation.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

from loraforge.config import ALL_LINEAR, LoraSection
from loraforge.errors import LoraforgeError
from loraforge.files import atomic_dir


def base_of(model):
    """The transformers model under a PEFT wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def linear_names(model) -> set[str]:
    """Last name component of every nn.Linear in the model, the lm_head excluded."""
    import torch

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


@contextmanager
def peft_wrapping():
    """Around PEFT wrapping a model: PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`
    property itself (no argument avoids it), so that one FutureWarning, and nothing else, is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def attach_adapter(model, lora: LoraSection, base_path: str | None = None):
    from peft import LoraConfig, get_peft_model

    present = linear_names(model)
    targets = [t for t in lora.target_modules if t in present]
    if lora.target_modules == ALL_LINEAR and not targets:  # the default on a non-Llama naming: every linear
        targets = sorted(present)
    missing = [t for t in lora.target_modules if t not in present]
    if not targets:
        raise LoraforgeError(f"none of lora.target_modules {lora.target_modules} is a linear layer of this "
                             f"model", hint=f"this model's linear layers are: {', '.join(sorted(present))}")
    if missing and lora.target_modules != ALL_LINEAR:
        raise LoraforgeError(f"lora.target_modules {missing} are not linear layers of this model",
                             hint=f"choose among: {', '.join(sorted(present))}")
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          use_dora=lora.adapter == "dora", bias="none", task_type="CAUSAL_LM")
    with peft_wrapping():
        peft_model = get_peft_model(model, peft_cfg)
    use_mask_dropout(peft_model)
    if base_path:
        peft_model.peft_config["default"].base_model_name_or_path = base_path
    return peft_model


def use_mask_dropout(model) -> None:
    """PEFT's nn.Dropout modules become MaskDropout (same p; the CPU masks ~3x cheaper, model.fast.dropout)."""
    import torch

    from loraforge.model.fast.dropout import MaskDropout

    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if drops is None:
            continue
        for name, d in drops.items():
            if type(d) is torch.nn.Dropout:
                drops[name] = MaskDropout(d.p)


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(model, out_dir: Path, tokenizer=None) -> Path:
    """Write the adapter (and tokenizer) to out_dir atomically; returns out_dir."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def load_adapter(base_model, adapter_dir: str | Path, *, trainable: bool = False):
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoraforgeError("no adapter_config.json here: not a PEFT adapter folder", where=str(adapter_dir))
    try:
        with peft_wrapping():
            return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=trainable)
    except (RuntimeError, ValueError) as e:  # shape mismatch: adapter made for another base
        raise LoraforgeError(f"this adapter does not fit the base model: {str(e).splitlines()[0]}",
                             where=str(adapter_dir), hint="load it over the base model it was trained on") from None
