"""MaskDropout (PEFT's lora_dropout on CPU): the rate asked for, survivors scaled, the same mask in backward,
a mask that follows the seeded generator, and attach_adapter puts it in place of nn.Dropout."""

import pytest
import torch

from loraforge.config import LoraSection
from loraforge.model.adapters import attach_adapter
from loraforge.model.fast.dropout import MaskDropout, keep_mask


def test_keep_mask_rate_and_independence():
    g = torch.Generator().manual_seed(0)
    m = keep_mask((1000, 999), 0.05, g)
    assert m.shape == (1000, 999) and m.dtype == torch.bool
    assert float((~m).float().mean()) == pytest.approx(0.05, abs=0.002)
    # the four 16-bit slices of each 64-bit draw are independent: neighbours agree as often as chance says
    flat = m.flatten()[:-3]
    same = float((flat[:-1] == flat[1:]).float().mean())
    assert same == pytest.approx(0.95 ** 2 + 0.05 ** 2, abs=0.005)
    assert torch.equal(m, keep_mask((1000, 999), 0.05, torch.Generator().manual_seed(0)))
    assert not torch.equal(m, keep_mask((1000, 999), 0.05, torch.Generator().manual_seed(1)))
    assert bool(keep_mask((7,), 0.0).all())


def test_mask_dropout_scales_survivors_and_backward_uses_the_same_mask():
    d = MaskDropout(0.2).train()
    x = torch.randn(300, 200, requires_grad=True)
    torch.manual_seed(3)
    y = d(x)
    kept = y != 0
    assert float((~kept).float().mean()) == pytest.approx(0.2, abs=0.01)
    assert torch.allclose(y[kept], x[kept] / 0.8)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], g[kept] / 0.8)
    torch.manual_seed(3)
    assert torch.equal(d(x), y)   # the default generator, seeded per micro-batch by the loop, fixes the mask
    assert torch.equal(d.eval()(x), x)


def test_attach_adapter_uses_mask_dropout(tiny_model):
    from loraforge.model.load import load_base

    model, _, _ = load_base(str(tiny_model))
    peft_model = attach_adapter(model, LoraSection(r=4, alpha=8, dropout=0.1))
    drops = [d for m in peft_model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert drops and all(type(d) is MaskDropout and d.p == 0.1 for d in drops)
    none = attach_adapter(load_base(str(tiny_model))[0], LoraSection(r=4, alpha=8, dropout=0.0))
    assert not any(isinstance(d, MaskDropout) for m in none.modules() if hasattr(m, "lora_dropout")
                   for d in m.lora_dropout.values())
