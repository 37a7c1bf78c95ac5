"""loraforge's NF4 dequantisation kernel (model.fast.nf4) run by Triton's CPU interpreter, against
bitsandbytes' own dequantize_4bit of the same packed weight: double quantisation and plain absmax, bf16 and
fp32 outputs, a weight whose size is not a multiple of the kernel's block, and packed bytes held as float32
words (FSDP2's storage). Skipped where Triton is not installed (CPU CI); tests/gpu runs it compiled."""

import pytest
import torch

triton = pytest.importorskip("triton")
bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture
def interpreted(triton_interpreter):
    from loraforge.model.fast import nf4

    return triton_interpreter(nf4)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
def test_kernel_rebuilds_the_weight_bitsandbytes_rebuilds(interpreted, nested):
    torch.manual_seed(0)
    w = (torch.randn(96, 200) * 0.05).to(torch.bfloat16)   # 19,200 weights: 10 programs, the last one partial
    w[3] = 0.0                                               # blocks of zeros: absmax 0
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    assert qs.nested is nested
    qs.dtype = torch.float32
    ref = bnbf.dequantize_4bit(packed, qs)                  # bitsandbytes' fp32 products
    out = interpreted.dequantize_nf4(packed, qs, torch.empty(w.shape))
    assert torch.equal(out, ref) and torch.equal(out[3], torch.zeros(200))
    assert (out - w.float()).abs().max() < 0.15 * w.float().abs().max()   # and it is the weight, quantised
    words = packed.reshape(-1).view(torch.float32)           # FSDP2 shards the packed bytes as float32 words
    assert torch.equal(interpreted.dequantize_nf4(words, qs, torch.empty(w.shape)), ref)
    # into bf16: the same products rounded once (the interpreter's rounding may differ from the GPU's by
    # one unit in the last place; tests/gpu checks the compiled kernel against bitsandbytes bit for bit)
    half = interpreted.dequantize_nf4(packed, qs, torch.empty(w.shape, dtype=torch.bfloat16))
    assert torch.allclose(half.float(), ref, rtol=2 ** -7, atol=0)


def test_kernel_takes_nf4_states_only_and_the_fast_path_uses_it_only_on_cuda(interpreted):
    w = torch.randn(64, 64).to(torch.bfloat16)
    _, nested = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, plain = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    _, fp4 = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert interpreted.handles(nested) and interpreted.handles(plain)
    assert fp4.quant_type == "fp4" and not interpreted.handles(fp4)
    nested.blocksize = 63
    assert not interpreted.handles(nested)

    from loraforge.model.fast.lora import FrozenGroup
    from loraforge.model.fast.state import FastState
    from loraforge.model.quant import quantize_linears_

    lin = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 32, bias=False))
    assert quantize_linears_(lin, "cpu") == 2
    group = FrozenGroup(list(lin), torch.bfloat16, FastState())
    assert group.quantized and group.nf4_kernel   # chosen for the group; CPU tensors still go to bitsandbytes
    rebuilt = group.get()
    ref = torch.cat([bnbf.dequantize_4bit(m.weight, m.weight.quant_state) for m in lin])
    assert torch.equal(rebuilt, ref.to(torch.bfloat16))
