"""4-bit NF4 base weights for QLoRA, through bitsandbytes (CUDA; CPU for in-memory test models).

NF4 storage with double quantisation (the scales themselves quantised) and bf16 compute, as in the
QLoRA paper. Two ways in: `bnb_config()` for transformers' from_pretrained (real checkpoints: each
shard is quantised as it lands on the GPU), and `quantize_linears_()` for a model already in memory
(benchmarks and tests build random-weight models from a config). The lm_head and embeddings stay
16-bit, as everyone does.
"""

from __future__ import annotations

from loraforge.errors import LoraforgeError


def require_bitsandbytes(device: str, cpu_ok: bool = False):
    if device != "cuda" and not (cpu_ok and device == "cpu"):
        raise LoraforgeError("model.quantization=nf4 (QLoRA) needs a CUDA GPU; this run is on "
                             f"{device}", hint="use model.quantization=none on CPU")
    try:
        import bitsandbytes
    except ImportError:
        raise LoraforgeError("model.quantization=nf4 needs bitsandbytes",
                             hint="pip install bitsandbytes (or use model.quantization=none)") from None
    return bitsandbytes


def bnb_config(storage: str = "uint8"):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_quant_storage=getattr(torch, storage))


def quantize_linears_(model, device: str = "cuda", skip: tuple[str, ...] = ("lm_head",), *,
                      storage: str = "uint8", store_on: str | None = None) -> int:
    """Replace every nn.Linear (but `skip`) by an NF4 bnb Linear4bit quantised on `device` (recent
    bitsandbytes also quantises on "cpu": tests), one at a time so that at most one 16-bit weight is on the GPU
    at once; `storage` is the packed bytes' dtype (quant_storage), `store_on` where the result is kept
    (e.g. "cpu" for FSDP2, which moves each rank's shard to its GPU); returns how many were replaced."""
    import torch

    bnb = require_bitsandbytes(device, cpu_ok=True)
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, torch.nn.Linear) or any(full.endswith(s) for s in skip):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  quant_storage=getattr(torch, storage), device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4",
                                         quant_storage=getattr(torch, storage)).to(device)
            if store_on and store_on != device:
                q.weight = q.weight.to(store_on)  # moves the packed bytes and the QuantState
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(store_on or device, torch.bfloat16),
                                            requires_grad=False)
            setattr(module, child_name, q)
            n += 1
    return n
