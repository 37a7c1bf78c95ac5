"""The few-row NF4 product (model.fast.nf4_matmul) under Triton's CPU interpreter, against x times bitsandbytes'
own dequantised weight: double quantisation and plain absmax, row counts from 1 to the limit, widths that are not
a multiple of the kernel's tiles, K cut into several parts, fp32 and fp16 inputs (the interpreter multiplies
bf16 tiles as raw bits; tests/gpu checks bf16 compiled). Skipped where Triton is not installed (CPU CI). And
the fast path reads packed weights only while decoding, only for a few rows, only on CUDA."""

import pytest
import torch

triton = pytest.importorskip("triton")
bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture
def interpreted(triton_interpreter):
    from loraforge.model.fast import nf4_matmul

    return triton_interpreter(nf4_matmul)


def _weight(n, k, nested, seed=0):
    torch.manual_seed(seed)
    w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
    w[2] = 0.0                                                # a row of zero blocks: absmax 0
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    assert qs.nested is nested
    qs.dtype = torch.float32                                 # bitsandbytes' fp32 products, unrounded
    return packed, qs, bnbf.dequantize_4bit(packed, qs)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
@pytest.mark.parametrize("m,n,k,split", [(1, 96, 256, 1), (5, 130, 512, 2), (16, 64, 1024, 3), (64, 70, 384, None),
                                         (3, 40, 200, 1), (7, 66, 1000, 2)])   # the last two: blocks span rows
def test_product_is_x_times_the_dequantised_weight(interpreted, nested, m, n, k, split):
    packed, qs, dense = _weight(n, k, nested)
    x = torch.randn(m, k)
    parts = interpreted.partial_products(x, packed, qs, n, split)
    assert parts.shape[1:] == (m, n) and parts.dtype == torch.float32
    if split is not None:
        assert parts.shape[0] == split
    ref = x @ dense.t()
    assert torch.allclose(parts.sum(0), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert torch.equal(parts.sum(0)[:, 2], torch.zeros(m))
    narrow = interpreted.partial_products(x, packed, qs, n, split, block_n=32)   # the bench's variant
    assert torch.allclose(narrow.sum(0), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    y = torch.full((m, n), 0.5)
    assert interpreted.add_matmul_(y, x, packed, qs) is y
    assert torch.allclose(y, ref + 0.5, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_half_inputs_and_float32_words(interpreted):
    packed, qs, dense = _weight(48, 256, True, seed=1)
    x = torch.randn(3, 256).half()
    ref = x.float() @ dense.half().float().t()   # weights rounded to the compute dtype, then multiplied
    got = interpreted.partial_products(x, packed, qs, 48, 2).sum(0)
    # (the interpreter multiplies fp16 tiles in numpy's fp16: a few 1e-3 off where the GPU adds in fp32)
    assert torch.allclose(got, ref, rtol=0, atol=4e-3 * float(ref.abs().max()))
    assert not torch.allclose(got, x.float() @ dense[:, torch.randperm(256)].t(), rtol=0, atol=0.05)
    words = packed.reshape(-1).view(torch.float32)            # FSDP2's storage of the packed bytes
    assert torch.equal(interpreted.partial_products(x, words, qs, 48, 2).sum(0), got)


def test_limits_are_checked(interpreted):
    packed, qs, _ = _weight(32, 128, False)
    with pytest.raises(AssertionError):
        interpreted.partial_products(torch.randn(interpreted.ROWS + 1, 128), packed, qs, 32)
    with pytest.raises(AssertionError):                      # the weight is not (n, k)
        interpreted.partial_products(torch.randn(2, 128), packed, qs, 16)


def test_splits_fill_the_programs_but_keep_four_tiles_a_part(monkeypatch):
    from loraforge.model.fast import nf4_matmul
    from loraforge.model.fast.nf4_matmul import BLOCK_K, splits

    cpu = torch.device("cpu")
    assert splits(4096, 14336, cpu) == 1                     # one program is all the interpreter wants
    assert splits(64, 4 * BLOCK_K - 1, cpu) == 1
    monkeypatch.setattr(nf4_matmul, "_programs", lambda device: 264)   # an H100: 132 multiprocessors, two each
    assert splits(4096, 4096, cpu) == 5                      # 64 column tiles x 5 parts >= 264 programs
    assert splits(4096, 14336, cpu) == 5
    assert splits(1024, 4096, cpu) == 8                      # 16 tiles want 17 parts; 4,096 / 512 allows 8
    assert splits(1024, 4096, cpu, block_n=32) == 8 and splits(28672, 4096, cpu) == 1
    assert splits(64, 4 * BLOCK_K - 1, cpu) == 1             # too short a K to cut


def test_the_fast_path_reads_packed_weights_only_while_decoding_a_few_cuda_rows():
    from loraforge.model.fast import nf4_matmul
    from loraforge.model.fast.lora import FrozenGroup
    from loraforge.model.fast.state import FastState
    from loraforge.model.quant import quantize_linears_

    lin = torch.nn.Sequential(torch.nn.Linear(128, 32, bias=False), torch.nn.Linear(128, 32, bias=False))
    assert quantize_linears_(lin, "cpu") == 2
    state = FastState()
    group = FrozenGroup(list(lin), torch.bfloat16, state)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert group.nf4_kernel and not group._packed(x)          # not decoding
    state.decoding = True
    assert not group._packed(x)                               # a CPU tensor: bitsandbytes rebuilds the weight
    ref = torch.cat([bnbf.dequantize_4bit(m.weight, m.weight.quant_state) for m in lin]).to(torch.bfloat16)
    assert torch.equal(group.product(x), x @ ref.t())
    big = torch.randn(nf4_matmul.ROWS + 1, 128, dtype=torch.bfloat16)
    assert not group._packed(big.cuda() if torch.cuda.is_available() else big)


def test_a_packed_product_that_fails_to_build_warns_once_and_rebuilds_from_then_on(monkeypatch):
    from loraforge.model.fast import nf4_matmul
    from loraforge.model.fast.lora import FrozenGroup
    from loraforge.model.fast.state import FastState
    from loraforge.model.quant import quantize_linears_

    lin = torch.nn.Sequential(torch.nn.Linear(128, 32, bias=False), torch.nn.Linear(128, 48, bias=False))
    assert quantize_linears_(lin, "cpu") == 2
    state = FastState(decoding=True)
    group = FrozenGroup(list(lin), torch.bfloat16, state)
    # the CPU stands in for CUDA here: the first projection's product works, the second's fails to build
    monkeypatch.setattr(FrozenGroup, "_packed", lambda self, x: not self.state.packed_failed)
    built = []

    def product(x, weight, qs, n):
        built.append(n)
        if n == 48:
            raise RuntimeError("PassManager::run failed")
        return torch.zeros(x.shape[0], n)

    monkeypatch.setattr(nf4_matmul, "product", product)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = torch.ones(3, 80, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="NF4 decoding rebuilds the 16-bit weights.*PassManager"):
        group.add_product_(y, x)
    ref = torch.cat([bnbf.dequantize_4bit(m.weight, m.weight.quant_state) for m in lin]).to(torch.bfloat16)
    assert state.packed_failed and built == [32, 48]
    assert torch.equal(y, torch.ones(3, 80, dtype=torch.bfloat16).addmm_(x, ref.t()))   # added once, rebuilt
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(group.product(x), x @ ref.t())
    assert built == [32, 48]


def test_groups_route_their_products_through_the_packed_kernel_while_decoding(monkeypatch):
    from loraforge.model.fast import nf4_matmul
    from loraforge.model.fast.lora import FrozenGroup
    from loraforge.model.fast.state import FastState
    from loraforge.model.quant import quantize_linears_

    lin = torch.nn.Sequential(torch.nn.Linear(128, 32, bias=False), torch.nn.Linear(128, 48, bias=False))
    assert quantize_linears_(lin, "cpu") == 2
    group = FrozenGroup(list(lin), torch.float32, FastState(decoding=True))
    # the CPU stands in for CUDA; the kernel's stand-in multiplies by bitsandbytes' dequantised weight
    monkeypatch.setattr(FrozenGroup, "_packed", lambda self, x: True)
    calls = []

    def product(x, weight, qs, n):
        calls.append(n)
        return x.float() @ bnbf.dequantize_4bit(weight, qs).float().t()

    monkeypatch.setattr(nf4_matmul, "product", product)
    ref = torch.cat([bnbf.dequantize_4bit(m.weight, m.weight.quant_state) for m in lin]).float()
    x = torch.randn(5, 128)
    got = group.product(x)                                   # (the gate/up path)
    assert calls == [32, 48] and torch.allclose(got, x @ ref.t(), atol=1e-5)
    y = torch.full((5, 80), 2.0)
    assert group.add_product_(y, x) is None                  # no 16-bit weight was made
    assert calls == [32, 48, 32, 48] and torch.allclose(y, x @ ref.t() + 2.0, atol=1e-5)
    w = group.add_product_(torch.zeros(5, 80), x, need_w=True)   # DoRA needs the weight: rebuilt
    assert calls == [32, 48, 32, 48] and torch.equal(w, ref)


def test_memory_errors_and_bugs_are_not_taken_for_a_failed_build(monkeypatch):
    from loraforge.model.fast import nf4_matmul
    from loraforge.model.fast.lora import FrozenGroup
    from loraforge.model.fast.state import FastState
    from loraforge.model.quant import quantize_linears_

    lin = torch.nn.Sequential(torch.nn.Linear(128, 32, bias=False))
    assert quantize_linears_(lin, "cpu") == 1
    state = FastState(decoding=True)
    group = FrozenGroup(list(lin), torch.float32, state)
    monkeypatch.setattr(FrozenGroup, "_packed", lambda self, x: True)
    for error in (torch.OutOfMemoryError("CUDA out of memory"), AssertionError("stride")):
        def product(*a, error=error):
            raise error

        monkeypatch.setattr(nf4_matmul, "product", product)
        with pytest.raises(type(error)):
            group.add_product_(torch.zeros(2, 32), torch.randn(2, 128))
        assert not state.packed_failed
