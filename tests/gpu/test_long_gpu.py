"""On a CUDA device, bf16 (liger kernels, the SwiGLU-LoRA and RoPE Triton kernels, NF4): the long-input
pieces against the plain ones: the MLP in chunks (model.fast.chunked), layers checkpointed in spans, and
liger's loss over blocks of rows, with offloaded recomputation, against the unchunked path and PEFT."""

import pytest
import torch
import torch.nn.functional as F

from loraforge.model.fast import FastLlama
from loraforge.model.fast import ops
from loraforge.train.loop import split_model
from test_fast_gpu import BF16, _batch, _grads, _small_llama, rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "nf4"])
@pytest.mark.parametrize("every", [1, 2])
def test_chunked_mlp_and_spans_match_unchunked_and_peft_in_bf16(quantize, every):
    model = _small_llama(quantize)
    batch = _batch()   # 2 x 200 tokens: chunks of 96 rows, the last one short
    ref_loss, ref = _grads(model, split_model(model), batch)
    plain_loss, plain = _grads(model, FastLlama(model, dtype=BF16, checkpointing="offload", mlp_chunk_tokens=0), batch)
    fast = FastLlama(model, dtype=BF16, checkpointing="offload", mlp_chunk_tokens=96, checkpoint_every=every)
    loss, got = _grads(model, fast, batch)
    assert loss == pytest.approx(plain_loss, rel=2e-3) and loss == pytest.approx(ref_loss, rel=5e-3)
    for k in ref:
        assert rel(got[k], plain[k]) < 2e-2, k
        assert rel(got[k], ref[k]) < 5e-2, k


def test_liger_loss_in_blocks_matches_one_call():
    torch.manual_seed(0)
    h = torch.randn(3000, 256, device="cuda", dtype=BF16, requires_grad=True)
    w = torch.randn(5000, 256, device="cuda", dtype=BF16) * 0.05
    y = torch.randint(0, 5000, (3000,), device="cuda")
    one = ops.linear_cross_entropy_sum(h, w, y)
    (g1,) = torch.autograd.grad(one, h)
    blocks = ops.linear_cross_entropy_sum(h, w, y, block=1024)
    (g2,) = torch.autograd.grad(blocks, h)
    ref = F.cross_entropy((h.float() @ w.float().t()), y, reduction="sum")
    assert float(blocks) == pytest.approx(float(one), rel=1e-3) and float(blocks) == pytest.approx(float(ref), rel=2e-3)
    assert rel(g2, g1) < 1e-2
