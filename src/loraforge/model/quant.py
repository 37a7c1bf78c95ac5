"""4-bit NF4 base weights for QLoRA, through bitsandbytes (CUDA only).

NF4 storage with double quantisation (the scales themselves quantised) and bf16 compute, as in the
QLoRA paper. Two ways in: `bnb_config()` for transformers' from_pretrained (real checkpoints: each
shard is quantised as it lands on the GPU), and `quantize_linears_()` for a model already in memory
(benchmarks and tests build random-weight models from a config). The lm_head and embeddings stay
16-bit, as everyone does.
"""

from __future__ import annotations

from loraforge.errors import LoraforgeError


def require_bitsandbytes(device: str):
    if device != "cuda":
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


def quantize_linears_(model, device: str = "cuda", skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear (but `skip`) by an NF4 bnb Linear4bit on `device`, one at a time so that
    at most one 16-bit weight is on the GPU at once; returns how many were replaced."""
    import torch

    bnb = require_bitsandbytes(device)
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, torch.nn.Linear) or any(full.endswith(s) for s in skip):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.bfloat16), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4").to(device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(device, torch.bfloat16), requires_grad=False)
            setattr(module, child_name, q)
            n += 1
    return n
