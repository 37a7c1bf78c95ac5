"""SwiGLU with the LoRA term added inside the kernel (model.fast.swiglu_lora): the Triton kernels run by
Triton's CPU interpreter in fp32 against autograd of the plain form silu(g) * u, [g | u] = y + xa B^T, with
equal and unequal ranks (and ranks below the 16 that tl.dot needs); skipped where Triton is not installed.
The torch form is what runs on CPU, checked here too; tests/gpu runs the compiled kernels in bf16."""

import pytest
import torch
import torch.nn.functional as F

from loraforge.model.fast import swiglu_lora as sl


def _inputs(n, inter, rg, ru, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 2 * inter, generator=g)
    xa = torch.randn(n, rg + ru, generator=g)
    b_blk = torch.block_diag(torch.randn(inter, rg, generator=g), torch.randn(inter, ru, generator=g)) * 0.3
    dh = torch.randn(n, inter, generator=g)
    return y, xa, b_blk, dh


def _reference(y, xa, b_blk, dh):
    y = y.clone().requires_grad_(True)
    gate, up = (y + xa @ b_blk.t()).chunk(2, dim=-1)
    h = F.silu(gate) * up
    (dy,) = torch.autograd.grad(h, y, dh)
    return h.detach(), dy


@pytest.mark.parametrize("n, inter, rg, ru", [(70, 96, 16, 16), (33, 40, 4, 8), (5, 130, 24, 3)])
def test_kernels_match_autograd_of_the_plain_form(triton_interpreter, n, inter, rg, ru):
    pytest.importorskip("triton")
    kernels = triton_interpreter(sl)
    y, xa, b_blk, dh = _inputs(n, inter, rg, ru)
    h_ref, dy_ref = _reference(y, xa, b_blk, dh)
    h = torch.empty(n, inter)
    kernels._launch(False, y, xa, b_blk, (rg, ru), h)
    assert torch.allclose(h, h_ref, atol=1e-4, rtol=1e-4)
    buf = y.clone()
    kernels._launch(True, buf, xa, b_blk, (rg, ru), dh)   # writes [dg | du] over the base output
    assert torch.allclose(buf, dy_ref, atol=1e-4, rtol=1e-4)


def test_torch_form_matches_autograd_and_leaves_y_alone():
    y, xa, b_blk, dh = _inputs(9, 24, 4, 4, seed=3)
    h_ref, dy_ref = _reference(y, xa, b_blk, dh)
    kept = y.clone()
    assert torch.allclose(sl.swiglu_lora(y, xa, b_blk, (4, 4)), h_ref, atol=1e-6)
    assert torch.allclose(sl.swiglu_lora_backward_(y, xa, b_blk, (4, 4), dh), dy_ref, atol=1e-5)
    assert torch.equal(y, kept)
