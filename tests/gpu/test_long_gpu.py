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


def test_per_row_log_probs_hold_one_chunk_of_logits():
    """The policy's log-probs of 4,096 loss tokens against a 128,256-token head (an 8B DPO micro-batch): the
    forward and backward's peak above their inputs stays within three chunks of fp32 logits (the checkpointed
    version held about 3 GiB: session 16's allocator history), and the values match the whole logits'."""
    torch.manual_seed(0)
    h = (torch.randn(4096, 4096, device="cuda") * 0.02).to(BF16).requires_grad_(True)
    w = (torch.randn(128256, 4096, device="cuda") * 0.02).to(BF16)
    y = torch.randint(0, 128256, (4096,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ops.linear_cross_entropy_rows(h, w, y)
    out.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    chunk = ops.ROWS_LOGITS_BYTES
    assert peak < 3 * chunk + 2 * h.numel() * h.element_size(), f"{peak / 2 ** 30:.2f} GiB above the inputs"
    with torch.no_grad():
        ref = F.cross_entropy((h[:512] @ w.t()).float(), y[:512], reduction="none")
    assert rel(out[:512].detach(), ref) < 1e-3
