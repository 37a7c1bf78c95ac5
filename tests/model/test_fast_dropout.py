"""The fast path's LoRA dropout (model.fast.dropout): masks fixed by a seed tensor, so the plain forward, the
recomputed one and the whole-stack (graph) path train on the same masks; and grouped projections with one
shared mask per group compute what PEFT computes when its dropout modules draw those same masks."""

import pytest
import torch

from loraforge.model.fast import FastLlama
from loraforge.model.fast.dropout import new_seed, reseed_, seeded_dropout
from loraforge.train.loop import loss_sum, split_model
from test_fast_path import _adapted, _batch, _close, _loss_and_grads


def test_mask_is_a_function_of_the_seed_and_stream():
    x = torch.randn(64, 300)
    seed = new_seed("cpu")
    torch.manual_seed(0)
    reseed_(seed)
    a, b = seeded_dropout(x, seed, 3, 0.25), seeded_dropout(x, seed, 3, 0.25)
    assert torch.equal(a, b)
    assert not torch.equal(a, seeded_dropout(x, seed, 4, 0.25))      # another stream, another mask
    dropped = float((a == 0).float().mean())
    assert dropped == pytest.approx(0.25, abs=0.02)
    kept = a != 0
    assert torch.allclose(a[kept], x[kept] / 0.75)                   # survivors scaled by 1 / (1 - p)
    reseed_(seed)
    assert not torch.equal(a, seeded_dropout(x, seed, 3, 0.25))      # a new seed, a new mask
    assert seeded_dropout(x, seed, 3, 0.0) is x


def test_backward_applies_the_same_mask():
    x = torch.randn(8, 50, requires_grad=True)
    seed = new_seed("cpu")
    seed.fill_(1234)
    y = seeded_dropout(x, seed, 0, 0.4)
    g = torch.randn_like(y)
    y.backward(g)
    mask = (y != 0).float() / 0.6
    assert torch.allclose(x.grad, g * mask)


@pytest.mark.parametrize("mode", [dict(checkpointing=True, graphs="off"), dict(checkpointing=True, graphs="eager"),
                                  dict(checkpointing=False, graphs="eager")], ids=["recompute", "stack", "stack-nockpt"])
def test_every_path_draws_the_plain_forwards_masks(mode):
    """Per-layer recomputation and the whole-stack path that CUDA graphs capture (eager here) give the loss and
    gradients of the plain forward, dropout on: the masks come from the seed tensor, not the generator."""
    model = _adapted("llama", dropout=0.3)
    batch = _batch()
    torch.manual_seed(5)
    plain = _loss_and_grads(model, FastLlama(model, dtype=torch.float32, checkpointing=False, graphs="off"), batch)
    torch.manual_seed(5)
    fast = FastLlama(model, dtype=torch.float32, **mode)
    got = _loss_and_grads(model, fast, batch)
    if mode["graphs"] == "eager":
        assert fast.graphs.eager is True    # the stack path ran
    assert got[0] == pytest.approx(plain[0], rel=1e-6)
    for k in plain[2]:
        _close(got[2][k], plain[2][k], 1e-6, k)
    torch.manual_seed(6)   # dropout is really on: another seed, another loss
    assert _loss_and_grads(model, fast, batch)[0] != pytest.approx(plain[0])


class _GroupMask(torch.nn.Module):
    """A PEFT lora_dropout module that draws the fast path's mask for its group."""

    def __init__(self, fast, stream: int, p: float):
        super().__init__()
        self.fast, self.stream, self.p = fast, stream, p

    def forward(self, x):
        return seeded_dropout(x, self.fast.state.dropout_seed, self.stream, self.p)


def test_grouped_dropout_equals_peft_with_the_groups_masks():
    """q/k/v and gate/up stay one group each with dropout on, sharing one mask: PEFT's forward, its dropout
    modules drawing those masks (streams 16 i + 0/4/8/12 for layer i), gives the same loss and gradients."""
    model = _adapted("llama", dropout=0.3)
    batch = _batch()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")
    assert all(len(layer.qkv.parts) == 1 and len(layer.gate_up.parts) == 1 for layer in fast.layers)
    torch.manual_seed(7)
    got = _loss_and_grads(model, fast, batch)
    base = model.get_base_model().model
    offsets = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 4, "gate_proj": 8, "up_proj": 8, "down_proj": 12}
    for i, layer in enumerate(base.layers):
        for name, off in offsets.items():
            module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            module.lora_dropout["default"] = _GroupMask(fast, 16 * i + off, 0.3)
    # the seed tensor still holds the value the fast forward drew: the reference reads the same masks
    ref = _loss_and_grads(model, split_model(model), batch)
    assert ref[0] == pytest.approx(got[0], rel=1e-5)
    for k in ref[2]:
        _close(got[2][k], ref[2][k], 1e-5, k)


def test_validation_has_no_dropout():
    model = _adapted("llama", dropout=0.3)
    batch = _batch()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True)
    model.eval()
    with torch.no_grad():
        a, b = float(fast.loss_sum(batch)[0]), float(loss_sum(model, batch, split_model(model))[0])
    assert a == pytest.approx(b, rel=1e-5)
