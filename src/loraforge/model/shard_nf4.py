"""NF4 (bitsandbytes Linear4bit) base weights made shardable by FSDP2, without touching bitsandbytes' classes.

FSDP2's fully_shard replaces every parameter by a plain DTensor parameter (its shard), and before each
forward by a plain unsharded tensor it all-gathered: a Params4bit's `quant_state` (absmax, NF4 code,
shape) does not travel with it, and Linear4bit.forward, PEFT's bnb LoRA layer and merges need it. So,
before fully_shard, `prepare_nf4_for_fsdp`:

- keeps each Linear4bit's QuantState aside on the module, moved to the compute device and replicated on
  every rank (absmax is one byte per 64 weights with double quantisation: ~1/32 of the packed bytes);
- replaces the Params4bit by a plain frozen parameter over the same packed bytes, viewed as float32
  (zero copy, whatever quant_storage the model was loaded with), which FSDP2 shards on dim 0. Why float32:
  an integer parameter is refused by FSDP2 in torch 2.11 (it creates every sharded parameter with
  requires_grad=True: "only Tensors of floating point dtype can require gradients", seen on the 2 x H200
  machine); a 16-bit one is not copied bit for bit: where every all-gather input of a group is bf16,
  FSDP2 copies them with CUDA's `_foreach_copy_`, which computes in fp32 and canonicalises the ~0.1% of
  packed bytes that spell a bf16 NaN (bitsandbytes issue #1945). float32 is its own compute type, so
  every copy FSDP2 makes of it is a plain move (a group mixing dtypes is even gathered as uint8 bytes).
  The trainer gives NF4 runs a mixed-precision policy that casts nothing (train.distributed.wrap);
- registers a forward pre-hook on each Linear4bit that puts the saved QuantState on whatever weight tensor
  is in place when it runs: after FSDP2's pre-forward all-gather of the enclosing layer, that is the
  unsharded parameter (FSDP2 keeps that object across steps and refills its storage, but the hook is
  cheap and also fires for the recomputation of a checkpointed layer in backward). The fast Llama path,
  which never calls Linear4bit.forward, reads the QuantState kept aside directly (model.fast.lora.quant_state).

The packed weights stay frozen (no gradient, no optimizer state); bitsandbytes' CPU inference repacking
(which rewrites weight.data in place in eval mode) is turned off on these modules, as FSDP2 owns that storage.
"""

from __future__ import annotations

from loraforge.errors import LoraforgeError

ATTR = "_loraforge_quant_state"


def nf4_linears(model) -> list[tuple[str, object]]:
    """(name, module) of every module whose weight carries a bitsandbytes QuantState (Linear4bit)."""
    found = []
    for name, module in model.named_modules():
        # the module that owns the parameter (PEFT's LoRA layer only forwards `weight` to its base layer)
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        qs = getattr(weight, "quant_state", None)
        if (qs is not None and type(qs).__name__ == "QuantState") or hasattr(module, ATTR):
            found.append((name, module))
    return found


def _reattach(module, args):
    import torch

    qs = getattr(module, ATTR)
    weight = module.weight
    if getattr(weight, "quant_state", None) is not qs:
        if weight.dtype != torch.float32:  # something cast the parameter (a mixed-precision policy)
            raise LoraforgeError(f"FSDP2 turned the packed NF4 bytes into {weight.dtype} numbers (torch "
                                 f"{torch.__version__})",
                                 hint="shard NF4 with a MixedPrecisionPolicy that casts nothing, or use "
                                      "train.distributed=ddp for QLoRA")
        weight.quant_state = qs


def prepare_nf4_for_fsdp(model, device) -> int:
    """Make every NF4 linear of `model` shardable by FSDP2 (call before fully_shard); returns how many.
    `device` is where the QuantStates live (the device FSDP2 computes on). Idempotent."""
    import torch

    n = 0
    for name, module in nf4_linears(model):
        if hasattr(module, ATTR):
            n += 1
            continue
        weight = module.weight
        qs = weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            raise RuntimeError(f"{name}: NF4 weight was repacked for CPU inference before sharding")
        packed = weight.data.contiguous().reshape(-1).view(torch.uint8)
        if packed.numel() % 4:
            raise LoraforgeError(f"{name}: {packed.numel()} packed NF4 bytes are not whole float32 words",
                                 hint="use train.distributed=ddp for this model")
        packed = packed.view(torch.float32).reshape(-1, 1)
        qs.to(device)
        setattr(module, ATTR, qs)
        module.weight = torch.nn.Parameter(packed, requires_grad=False)
        module.support_avx512bf16_for_cpu = False
        module.register_forward_pre_hook(_reattach)
        n += 1
    return n


def packed_nf4_parameters(model) -> dict[str, object]:
    """name -> the packed NF4 parameter (sharded or not) of every prepared linear, as named_parameters names it."""
    prepared = {id(m.weight) for _, m in nf4_linears(model) if hasattr(m, ATTR)}
    return {n: p for n, p in model.named_parameters() if id(p) in prepared}
