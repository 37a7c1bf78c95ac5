"""Long inputs on the fast path (CPU, fp32): the MLP one chunk of tokens at a time (model.fast.chunked)
gives the unchunked outputs and gradients, for the MLP function and for a whole tiny model's loss; RoPE
scaling (llama3, yarn, linear, dynamic) reaches the fast path's tables and rotations as transformers' own
rotary embedding computes them, at positions up to 131,072."""

import pytest
import torch

from loraforge.config import LoraSection, build_config
from loraforge.errors import LoraforgeError
from loraforge.model.adapters import attach_adapter
from loraforge.model.fast import FastLlama, why_not_fast
from loraforge.model.fast.chunked import chunk_rows, mlp_backward_chunked, mlp_forward_chunked
from loraforge.model.fast.ops import rope, rope_qkv
from loraforge.train.loop import split_model
from test_fast_path import SHAPE, _adapted, _batch, _close, _loss_and_grads

SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}
# the longest position each config declares: dynamic scaling starts beyond it (the others are scaled throughout)
MAX_POS = {"dynamic": 8192}


def test_chunk_rows_follows_the_setting():
    assert chunk_rows(16384, "auto") == 0 and chunk_rows(16385, "auto") == 8192
    assert chunk_rows(10**6, 0) == 0 and chunk_rows(100, 7) == 7 and chunk_rows(7, 7) == 0


def test_mlp_chunk_tokens_config():
    assert build_config({"model": {"mlp_chunk_tokens": 4096}}).model.mlp_chunk_tokens == 4096
    assert build_config({}).model.mlp_chunk_tokens == "auto"
    with pytest.raises(LoraforgeError, match="mlp_chunk_tokens"):
        build_config({"model": {"mlp_chunk_tokens": -1}})


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_chunked_mlp_equals_the_whole_one(adapter):
    """One layer's h + MLP(norm(h)) over chunks of 7 rows (the last one short): the same output without
    grad, the same input gradient and adapter gradients with it."""
    model = _adapted("qwen2", adapter)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True)
    layer = fast.layers[1]
    params = [p for p in fast.decoder.layers[1].mlp.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 20, SHAPE["hidden_size"], generator=g)
    grad = torch.randn(h.shape, generator=g)

    x = h.clone().requires_grad_(True)
    out = layer.mlp(x)
    torch.autograd.backward(out, grad)
    ref = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        _close(mlp_forward_chunked(layer.mlp, h.clone(), 7, fast.state), out.detach(), 1e-6, "output")
    dx = mlp_backward_chunked(layer.mlp, h.clone(), grad, 7, fast.state)
    _close(dx, x.grad, 1e-6, "input gradient")
    assert len(ref) >= 6
    for p, r in zip(params, ref):
        _close(p.grad, r, 1e-5, "adapter gradient")


@pytest.mark.parametrize("kind,adapter", [("llama", "lora"), ("qwen3", "dora")])
def test_chunked_model_loss_and_grads_match_peft(kind, adapter):
    """Chunks of 7 and 16 tokens of a 3 x 20 batch, checkpointed: PEFT's loss and gradients (as unchunked)."""
    model = _adapted(kind, adapter)
    batch = _batch()
    ref_loss, _, ref_grads = _loss_and_grads(model, split_model(model), batch)
    for chunk in (7, 16):
        fast = FastLlama(model, dtype=torch.float32, checkpointing=True, mlp_chunk_tokens=chunk)
        assert fast.layers[0].rows(torch.empty(3, 20)) == chunk
        loss, _, grads = _loss_and_grads(model, fast, batch)
        assert loss == pytest.approx(ref_loss, rel=1e-5), chunk
        for k in grads:
            _close(grads[k], ref_grads[k], 1e-5, f"{k} (chunks of {chunk})")
        with torch.no_grad():   # evaluation: the forward alone, chunked
            assert float(fast.loss_sum(batch)[0]) == pytest.approx(ref_loss, rel=1e-5)


def test_chunked_recomputation_replays_dropout_masks():
    """Dropout in the chunked MLP: the recomputed chunks draw the forward's masks (the loss and gradients
    of the recomputed path equal those of a pass without checkpointing over the same chunks)."""
    model = _adapted("llama", dropout=0.3)
    batch = _batch()
    torch.manual_seed(5)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, mlp_chunk_tokens=7)
    loss, _ = fast.loss_sum(batch)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    # the same draws without recomputation: a forward with grad over the same chunks, in the same order
    torch.manual_seed(5)
    plain = FastLlama(model, dtype=torch.float32, checkpointing=False, mlp_chunk_tokens=7)
    for layer in plain.layers:
        layer.mlp = _grad_chunks(layer.mlp, 7, plain.state)
    loss2, _, grads2 = _loss_and_grads(model, plain, batch)
    assert float(loss.detach()) == pytest.approx(loss2, rel=1e-6)
    for k in grads:
        _close(grads[k], grads2[k], 1e-6, k)


def _grad_chunks(mlp, rows, state):
    """mlp over chunks of rows with grad, each chunk's dropout stream as model.fast.chunked sets it."""
    def one(flat, s):
        state.dropout_rows = s
        return mlp(flat[s:s + rows])

    def run(h):
        flat = h.reshape(-1, h.shape[-1])
        out = torch.cat([one(flat, s) for s in range(0, flat.shape[0], rows)]).view(h.shape)
        state.dropout_rows = 0
        return out
    return run


def _scaled_model(kind: str, scaling: dict):
    import transformers as tr

    cfg_cls, model_cls = {"llama": (tr.LlamaConfig, tr.LlamaForCausalLM),
                          "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM)}[kind]
    most = MAX_POS.get(scaling["rope_type"], 131072)
    cfg = cfg_cls(**{**SHAPE, "max_position_embeddings": most}, rope_theta=500000.0, rope_scaling=dict(scaling))
    torch.manual_seed(0)
    return model_cls(cfg).float().eval()


def _rotary(scaling: dict | None, head_dim: int = 16):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    most = MAX_POS.get((scaling or {}).get("rope_type"), 131072)
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=most,
                      rope_theta=500000.0, rope_scaling=dict(scaling) if scaling else None)
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_rope_rotations_match_transformers(name):
    """At positions up to 131,072 the fast path's rotations (the torch form of ops.rope and rope_qkv, which
    the Triton kernels compute from the same tables: they read the first half of cos/sin) equal
    transformers' apply_rotary_pos_emb with its scaled rotary embedding; and the scaling changes them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rot, plain = _rotary(SCALINGS[name]), _rotary(None)
    pos = torch.cat([torch.arange(0, 8), torch.arange(131072 - 24, 131072)])[None]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, pos.shape[1], 16, generator=g) for heads in (4, 2, 2))
    x = torch.zeros(1, pos.shape[1], 1, 16)
    cos, sin = rot(x, pos)
    assert torch.equal(cos[..., :8], cos[..., 8:]) and torch.equal(sin[..., :8], sin[..., 8:])
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rope(q, k, cos, sin)
    _close(got_q, ref_q, 1e-6, "q")
    _close(got_k, ref_k, 1e-6, "k")
    qkv = torch.cat([t.transpose(1, 2).reshape(1, pos.shape[1], -1) for t in (q, k, v)], dim=-1)
    out = rope_qkv(qkv, cos, sin, 4, 2, 16).view(1, pos.shape[1], 8, 16).transpose(1, 2)
    _close(out[:, :4], ref_q, 1e-6, "q of rope_qkv")
    _close(out[:, 4:6], ref_k, 1e-6, "k of rope_qkv")
    plain_cos, _ = plain(x, pos)
    assert float((plain_cos - cos).abs().max()) > 1e-2, "the scaling changed nothing"


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_scaled_rope_fast_loss_and_grads_match_peft(kind, name):
    """A tiny model with rope scaling, its rows at positions 131,000 and up (one example per row, given
    as position ids): the fast path's loss and gradients equal PEFT's forward."""
    model = attach_adapter(_scaled_model(kind, SCALINGS[name]), LoraSection(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.2)
    model.train()
    assert why_not_fast(model) is None
    batch = _batch()
    batch["position_ids"] = torch.arange(131000, 131020)[None].expand(3, -1).clone()
    batch["segment_ids"] = torch.zeros_like(batch["input_ids"])
    ref_loss, _, ref_grads = _loss_and_grads(model, split_model(model), batch)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True)
    loss, _, grads = _loss_and_grads(model, fast, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for k in grads:
        _close(grads[k], ref_grads[k], 1e-5, k)
    with torch.no_grad():   # and the positions matter: the hidden states at 0..19 differ, well above fp32 noise
        far = fast.hidden(batch["input_ids"], batch["position_ids"], batch["segment_ids"])
        near = fast.hidden(batch["input_ids"], batch["position_ids"] - 131000, batch["segment_ids"])
    assert float((far - near).abs().max()) > 1e-5 * float(far.abs().max())


def test_loss_runs_liger_in_blocks_of_rows_on_long_inputs(monkeypatch):
    """On CUDA the fused linear cross-entropy takes at most LOSS_BLOCK_ROWS rows a call (its logits chunk
    grows with a call's rows): a stand-in for liger's function records the calls; the summed loss and the
    input gradient equal one call over all rows."""
    from loraforge.model.fast import ops

    calls = []

    class FakeLiger:
        @staticmethod
        def liger_fused_linear_cross_entropy(h, w, y, reduction="mean", chunk_mem_const=1):
            calls.append((h.shape[0], chunk_mem_const))
            return torch.nn.functional.cross_entropy(h @ w.t(), y, reduction=reduction)

    monkeypatch.setattr(ops, "use_kernels", lambda t: True)
    monkeypatch.setattr(ops, "_liger", lambda: FakeLiger)
    monkeypatch.setattr(ops, "SMALL_LOSS_BYTES", 0)   # these logits are small: see the next test
    ops._flce_chunking.cache_clear()
    try:
        g = torch.Generator().manual_seed(0)
        h, w = torch.randn(50, 8, generator=g), torch.randn(11, 8, generator=g)
        y = torch.randint(0, 11, (50,), generator=g)
        grads = []
        for block in (50, 16):
            x = h.clone().requires_grad_(True)
            loss = ops.linear_cross_entropy_sum(x, w, y, block=block)
            loss.backward()
            grads.append((float(loss), x.grad))
    finally:
        ops._flce_chunking.cache_clear()
    assert calls == [(50, 8), (16, 8), (16, 8), (16, 8), (2, 8)]
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-6)
    _close(grads[1][1], grads[0][1], 1e-6, "input gradient")


def test_small_losses_skip_liger_on_cuda(monkeypatch):
    """Logits under SMALL_LOSS_BYTES (a classification batch's few answer tokens) go through _LinearLogp's one
    chunk on CUDA too, not liger's host-side chunk loop; the same sum and input gradient as whole logits."""
    from loraforge.model.fast import ops

    calls = []

    class FakeLiger:
        @staticmethod
        def liger_fused_linear_cross_entropy(h, w, y, reduction="mean", **_):
            calls.append(h.shape[0])
            return torch.nn.functional.cross_entropy(h @ w.t(), y, reduction=reduction)

    monkeypatch.setattr(ops, "use_kernels", lambda t: True)
    monkeypatch.setattr(ops, "_liger", lambda: FakeLiger)
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(40, 8, generator=g, requires_grad=True), torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (40,), generator=g)
    loss = ops.linear_cross_entropy_sum(h, w, y)
    loss.backward()
    ref_h = h.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_h @ w.t(), y, reduction="sum")
    ref.backward()
    assert calls == [] and float(loss) == pytest.approx(float(ref), rel=1e-6)
    _close(h.grad, ref_h.grad, 1e-6, "input gradient")
    monkeypatch.setattr(ops, "SMALL_LOSS_BYTES", 40 * 11 * 4 - 1)   # one byte less: liger's
    ops._flce_chunking.cache_clear()
    ops.linear_cross_entropy_sum(h, w, y)
    ops._flce_chunking.cache_clear()   # computed from the stand-in
    assert calls == [40]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_layers_checkpointed_in_spans_match(monkeypatch, dropout):
    """model.checkpoint_every = 2 over 3 layers (spans [0, 1] and [2]), the MLP in chunks: without dropout
    PEFT's loss and gradients; with dropout those of checkpointing each layer (the same masks replayed)."""
    monkeypatch.setitem(SHAPE, "num_hidden_layers", 3)
    model = _adapted("llama", dropout=dropout)
    batch = _batch()
    if dropout:
        torch.manual_seed(5)
        ref_loss, _, ref_grads = _loss_and_grads(model, FastLlama(model, dtype=torch.float32, mlp_chunk_tokens=7),
                                                 batch)
        torch.manual_seed(5)
    else:
        ref_loss, _, ref_grads = _loss_and_grads(model, split_model(model), batch)
    fast = FastLlama(model, dtype=torch.float32, mlp_chunk_tokens=7, checkpoint_every=2)
    assert [len(s.layers) for s in fast.spans] == [2, 1] and fast.graphs is None
    loss, _, grads = _loss_and_grads(model, fast, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for k in grads:
        _close(grads[k], ref_grads[k], 1e-5, k)


def test_rotary_tables_the_kernels_cannot_take_fall_back_to_peft():
    """A rotary embedding that rotates part of each head (tables narrower than head_dim) is not the fast
    path's RoPE: why_not_fast says so, and fast_engine leaves the model on PEFT's forward with that note."""
    from loraforge.model.fast import fast_engine

    model = _adapted("llama")
    assert why_not_fast(model) is None
    rot = model.get_base_model().model.rotary_emb
    rot.inv_freq = rot.inv_freq[: rot.inv_freq.shape[0] // 2].clone()
    assert "rotary" in why_not_fast(model)
    said = []
    assert fast_engine(model, "on", "cpu", torch.float32, True, log=said.append) is None
    assert "plain PEFT path" in said[0] and "rotary" in said[0]


@pytest.mark.parametrize("rows", [None, 7, 64])
def test_per_row_log_probs_in_chunks_match_the_whole_logits(rows):
    """linear_cross_entropy_rows (DPO/ORPO/KTO/GRPO's policy log-probs): values, input and weight gradients
    equal the plain cross-entropy over the whole logits, under an uneven upstream gradient (the per-row case
    liger's kernel once got wrong), whatever the chunking; and backward saves the inputs and one number per
    row, never a (rows x vocab) tensor."""
    from loraforge.model.fast import ops

    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 24, generator=g, dtype=torch.float64)
    w = torch.randn(97, 24, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, 97, (50,), generator=g)
    up = torch.randn(50, generator=g, dtype=torch.float64)
    a, wa = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(a @ wa.t(), y, reduction="none")
    (ref * up).sum().backward()
    b, wb = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = ops.linear_cross_entropy_rows(b, wb, y, rows)
    assert out.dtype == torch.float32 and out.shape == (50,)
    (out * up).sum().backward()
    _close(out.detach().double(), ref.detach(), 1e-6, "per-row loss")
    _close(b.grad, a.grad, 1e-5, "input gradient")
    _close(wb.grad, wa.grad, 1e-5, "weight gradient")
    assert all(97 not in s or s == w.shape for s in saved), saved
    assert ops.linear_cross_entropy_rows(h[:0], w, y[:0]).shape == (0,)


def test_per_row_log_probs_chunk_follows_the_vocabulary(monkeypatch):
    """The default chunk holds ROWS_LOGITS_BYTES of fp32 logits: 523 rows at Llama-3's 128,256 tokens."""
    from loraforge.model.fast import ops

    seen = []
    real = ops._LinearLogp.apply
    monkeypatch.setattr(ops._LinearLogp, "apply", lambda h, w, y, rows: seen.append(rows) or real(h, w, y, rows))
    ops.linear_cross_entropy_rows(torch.randn(3, 4), torch.randn(128256, 4), torch.tensor([0, 5, 9]))
    assert seen == [ops.ROWS_LOGITS_BYTES // (4 * 128256)] == [523]
