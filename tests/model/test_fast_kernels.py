"""loraforge's Triton RoPE kernel (model.fast.kernels) run by Triton's CPU interpreter in fp32, against the
torch rotation: forward, inverse, and the autograd function's gradient. Skipped where Triton is not
installed (CPU CI); tests/gpu runs the same kernel compiled, in bf16."""

import pytest
import torch

triton = pytest.importorskip("triton")


@pytest.fixture
def interpreted(triton_interpreter):
    from loraforge.model.fast import kernels

    return triton_interpreter(kernels)


def _rot(x, cos, sin):
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat((-b, a), -1) * sin


def _cos_sin(bsz, t, d):
    pos = torch.arange(t, dtype=torch.float32)[None].expand(bsz, -1) + torch.arange(bsz)[:, None] * 3.0
    f = pos[..., None] / 10000 ** (torch.arange(0, d, 2).float() / d)
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("per_row", [True, False])
def test_rope_kernel_rotates_q_and_k_heads_in_place(interpreted, per_row):
    torch.manual_seed(0)
    bsz, t, hq, hkv, d = 2, 5, 4, 2, 8
    qkv = torch.randn(bsz, t, (hq + 2 * hkv) * d)
    cos, sin = _cos_sin(bsz, t, d)
    if not per_row:
        cos, sin = cos[:1], sin[:1]
    ref = qkv.view(bsz, t, -1, d).clone()
    ref[:, :, :hq + hkv] = _rot(ref[:, :, :hq + hkv], cos[:, :, None], sin[:, :, None])
    out = interpreted.rope_qk_(qkv.clone(), cos, sin, hq + hkv, d)
    assert torch.allclose(out.view(bsz, t, -1, d), ref, atol=1e-6)
    assert torch.equal(out.view(bsz, t, -1, d)[:, :, hq + hkv:], qkv.view(bsz, t, -1, d)[:, :, hq + hkv:])
    back = interpreted.rope_qk_(out.clone(), cos, sin, hq + hkv, d, backward=True)
    assert torch.allclose(back, qkv, atol=1e-5)


@pytest.mark.parametrize("fresh_grad", [False, True])
def test_rope_function_gradient_equals_autograd_of_the_rotation(interpreted, fresh_grad):
    """The gradient is the inverse rotation; a gradient the caller holds stays untouched unless the caller
    says it is autograd's own (then it is rotated in place: as the decoder layer uses it, behind a split)."""
    torch.manual_seed(1)
    bsz, t, hq, hkv, d = 2, 6, 4, 1, 16
    qkv = torch.randn(bsz, t, (hq + 2 * hkv) * d)
    cos, sin = _cos_sin(bsz, t, d)
    w = torch.randn_like(qkv)
    x = qkv.clone().requires_grad_(True)
    y = interpreted.RopeQKV.apply(x * 1, cos, sin, hq + hkv, d, fresh_grad)
    if fresh_grad:   # the layer's use: q, k, v split out of the rotated buffer
        parts = y.view(bsz, t, -1, d).split([hq, hkv, hkv], dim=2)
        (gx,) = torch.autograd.grad(parts, x, [p for p in w.view(bsz, t, -1, d).split([hq, hkv, hkv], dim=2)])
    else:
        held = w.clone()
        (gx,) = torch.autograd.grad(y, x, held)
        assert torch.equal(held, w), "the caller's gradient tensor was rotated in place"
    x2 = qkv.clone().requires_grad_(True)
    r = x2.view(bsz, t, -1, d)
    y2 = torch.cat([_rot(r[:, :, :hq + hkv], cos[:, :, None], sin[:, :, None]), r[:, :, hq + hkv:]], 2)
    (y2.reshape(bsz, t, -1) * w).sum().backward()
    assert torch.allclose(y, y2.reshape(bsz, t, -1), atol=1e-6)
    assert torch.allclose(gx, x2.grad, atol=1e-5)
