"""The whole-stack path that CUDA graphs capture (model.fast.graphs), run eagerly on CPU: the same loss and
gradients as the per-layer path and as PEFT, gradients that accumulate over micro-batches, one set of graphs
per batch shape, packed rows, and the conditions under which the graphs stay out (a shape seen once, an eval
forward). The graphs themselves are compared on the device: tests/gpu/test_fast_gpu.py."""

import pytest
import torch

from loraforge.config import build_config
from loraforge.model.fast import FastLlama
from loraforge.model.fast.graphs import StackGraphs
from loraforge.train.loop import loss_sum, split_model
from test_fast_path import _adapted, _batch, _close, _loss_and_grads


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_stack_path_has_the_per_layer_loss_and_gradients(kind, adapter):
    model = _adapted(kind, adapter)
    batch = _batch()
    ref_loss, ref_n, ref = _loss_and_grads(model, split_model(model), batch)
    per_layer = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")
    assert per_layer.graphs is None
    loss0, _, grads0 = _loss_and_grads(model, per_layer, batch)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="eager")
    loss, n, grads = _loss_and_grads(model, fast, batch)
    assert fast.graphs.eager is True and fast.graphs.current.saved is None   # the stack ran, let go of its inputs
    assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5) and loss == pytest.approx(loss0, rel=1e-6)
    assert grads.keys() == ref.keys()
    for k in grads:
        _close(grads[k], ref[k], 1e-5, k)
        _close(grads[k], grads0[k], 1e-6, k)


def test_gradients_accumulate_over_micro_batches():
    model = _adapted("llama")
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="eager")
    a, b = _batch(2), _batch(7)
    ga = _loss_and_grads(model, fast, a)[2]
    gb = _loss_and_grads(model, fast, b)[2]
    model.zero_grad(set_to_none=True)
    for batch in (a, b):
        fast.loss_sum(batch)[0].backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            _close(p.grad, ga[k] + gb[k], 1e-6, k)


def test_graphs_apply_with_dropout_and_without_checkpointing():
    assert FastLlama(_adapted("llama", dropout=0.1), dtype=torch.float32, checkpointing=True).graphs is not None
    model = _adapted("llama")
    assert FastLlama(model, dtype=torch.float32, checkpointing=False).graphs is not None
    assert FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off").graphs is None
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="eager")
    model.eval()
    with torch.no_grad():
        fast.loss_sum(_batch())
    assert fast.graphs.eager is None   # no training step: the per-layer path ran


def _packed_batch():
    """Two batches' worth of packed rows as the trainer collates them where graphs replay: padded to a length
    bucket and to full rows, with the segment offsets (data.packing.cu_seqlens)."""
    from loraforge.data.batching import collate
    from loraforge.data.packing import pack
    from loraforge.data.templates import Tokenized

    g = torch.Generator().manual_seed(5)
    items = []
    for i, n in enumerate([9, 14, 5, 11, 7]):
        ids = torch.randint(1, 90, (n,), generator=g).tolist()
        items.append(Tokenized(ids, [-100] * 2 + ids[2:], f"e{i}"))
    rows = pack(items, 20)
    return collate(rows, 0, buckets=[24], rows=len(rows) + 1)


@pytest.mark.parametrize("ckpt", [True, False])
def test_packed_rows_through_the_stack_path_match_per_layer(ckpt):
    """Packed rows (padded to a bucket and to full rows, as where graphs replay) run through the stack path
    with the per-layer path's loss and gradients; a capturing FastLlama on CPU (a mask, not varlen) keeps them
    on the per-layer path."""
    model = _adapted("llama")
    batch = _packed_batch()
    assert batch["input_ids"].shape == (4, 24) and int(batch["cu_seqlens"][-1]) == 4 * 24
    ref_loss, ref_n, ref = _loss_and_grads(model, FastLlama(model, dtype=torch.float32, checkpointing=ckpt,
                                                             graphs="off"), batch)
    plain = _loss_and_grads(model, split_model(model), batch)
    stack = FastLlama(model, dtype=torch.float32, checkpointing=ckpt, graphs="eager")
    loss, n, grads = _loss_and_grads(model, stack, batch)
    assert stack.graphs.eager is True and n == ref_n == plain[1]
    assert loss == pytest.approx(ref_loss, rel=1e-6) and loss == pytest.approx(plain[0], rel=1e-5)
    for k in grads:
        _close(grads[k], ref[k], 1e-6, k)
    capturing = FastLlama(model, dtype=torch.float32, checkpointing=ckpt)
    for _ in range(2):
        _loss_and_grads(model, capturing, batch)
    assert capturing.graphs.eager is None


def test_backward_into_buffers_gives_the_returned_gradients():
    """The backward graph copies each layer's gradients into buffers as soon as they are known (`into`);
    they equal the returned ones."""
    from loraforge.model.fast.graphs import stack_backward, stack_forward

    model = _adapted("llama")
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")
    h = torch.randn(2, 10, 48)
    cos, sin = model.get_base_model().model.rotary_emb(h, torch.arange(10)[None].expand(2, -1))
    params = [[p for p in layer.parameters() if p.requires_grad] for layer in fast.decoder.layers]
    out, saved = stack_forward(fast.layers, h, cos, sin, None)
    g = torch.randn_like(out)
    returned = stack_backward(fast.layers, params, g, cos, sin, saved, None)
    into = [[torch.full_like(p, float("nan")) for p in ps] for ps in params]
    assert stack_backward(fast.layers, params, g, cos, sin, saved, None, into=into) is None
    flat = [t for ts in into for t in ts]
    assert len(flat) == len(returned) == 2 * 14   # two layers, seven projections, A and B
    for a, b in zip(flat, returned):
        assert torch.equal(a, b)


def test_auto_keeps_graphs_to_host_bound_steps():
    """auto: graphs for steps whose per-layer matmul work is small (a 1B model), not for an 8B one."""
    from loraforge.model.fast.graphs import HOST_BOUND_WORK

    auto = StackGraphs([], [], None, layer_weights=60_817_408, only_host_bound=True)   # Llama-3.2-1B layer
    assert auto.host_bound(4096) and not StackGraphs([], [], None, layer_weights=218_103_808,
                                                     only_host_bound=True).host_bound(4096)   # Llama-3.1-8B
    big = StackGraphs([], [], None, layer_weights=int(HOST_BOUND_WORK), only_host_bound=True)
    h, cos = torch.zeros(1, 2, 4), torch.zeros(1, 2, 2)
    assert not big.ready(h, cos) and not big.ready(h, cos)   # never captures
    on = StackGraphs([], [], None, layer_weights=int(HOST_BOUND_WORK), only_host_bound=False)
    assert not on.ready(h, cos) and on.ready(h, cos)
    fast = FastLlama(_adapted("llama"), dtype=torch.float32, checkpointing=True)
    # q, k, v (2 heads of 12), o; gate, up, down: the frozen weights of one layer of SHAPE
    assert fast.graphs.layer_weights == 48 * (48 + 2 * 24 + 48) + 3 * 48 * 80


def test_auto_drops_graphs_when_the_runs_largest_batch_is_not_host_bound():
    """A run whose longest batches are GPU-bound gets no graphs for its short ones (their pool would sit
    beside the eager peak); `on` keeps them, and a run that is host-bound throughout keeps them under auto."""
    from loraforge.model.fast.graphs import HOST_BOUND_WORK

    small = FastLlama(_adapted("llama"), dtype=torch.float32, checkpointing=True)
    tokens = int(HOST_BOUND_WORK // small.graphs.layer_weights)
    assert small.fit_graphs(tokens - 64) is False   # host-bound but on the CPU: no buckets ...
    assert small.graphs is not None                  # ... and the graphs stay
    assert small.fit_graphs(tokens + 64) is False and small.graphs is None
    on = FastLlama(_adapted("llama"), dtype=torch.float32, checkpointing=True, graphs="on")
    on.fit_graphs(tokens + 64)
    assert on.graphs is not None


def test_capture_waits_for_a_shape_that_repeats():
    graphs = StackGraphs([], [], None, capture=True)
    a, b, cos = torch.zeros(2, 8, 4), torch.zeros(2, 9, 4), torch.zeros(1, 8, 2)
    assert not graphs.ready(a, cos)      # first sight: eager (warms up kernels and buffers)
    assert graphs.ready(a, cos)          # seen twice in a row: captured now
    graphs.key = graphs.shape_key(a, cos)
    assert not graphs.ready(b, cos)      # another shape: eager, the graphs stay for a
    assert graphs.ready(a, cos)
    graphs.failed = "capture failed"
    assert not graphs.ready(a, cos)


def test_cuda_graphs_option_reaches_the_fast_path(tiny_model, tmp_path):
    from conftest import chat_rows, tiny_config, write_jsonl
    from loraforge.model.load import load_base
    from loraforge.model.prepare import prepare_for_training

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    tree = tiny_config(tiny_model, data, tmp_path / "run")
    tree["lora"] = {"dropout": 0.1}
    tree["model"] = {"fast_path": "on", "gradient_checkpointing": True, "cuda_graphs": "off"}
    cfg = build_config(tree)
    base, _, _ = load_base(str(tiny_model), device="cpu")
    _, fast = prepare_for_training(base, cfg, "cpu", torch.float32, base_path=str(tiny_model))
    assert fast is not None and fast.graphs is None
    tree["model"]["cuda_graphs"] = "auto"
    base, _, _ = load_base(str(tiny_model), device="cpu")
    _, fast = prepare_for_training(base, build_config(tree), "cpu", torch.float32, base_path=str(tiny_model))
    assert fast.graphs is not None and fast.graphs.capture
    # on CPU the stack never captures: the per-layer path trains, with PEFT's loss
    model = fast.model
    s, n = fast.loss_sum(_tokens(model))
    ref = loss_sum(model, _tokens(model), split_model(model))[0]
    assert float(s) == pytest.approx(float(ref), rel=1e-5) and fast.graphs.eager is None


def _tokens(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def test_each_batch_shape_gets_graphs_of_its_own():
    """GraphSet: one StackGraphs per shape, each captured at its own second step; shapes beyond the limit
    stay eager; interleaved shapes each replay their own graphs."""
    from loraforge.model.fast.graphs import GraphSet

    graphs = GraphSet([], [], None, capture=True, limit=2)
    made = []
    graphs.make = lambda: made.append(StackGraphs([], [], None, capture=True)) or made[-1]
    a, b, c, cos = torch.zeros(2, 8, 4), torch.zeros(2, 16, 4), torch.zeros(2, 24, 4), torch.zeros(1, 8, 2)
    assert not graphs.ready(a, cos) and not graphs.ready(b, cos)   # first sight of each: eager
    assert graphs.ready(a, cos) and graphs.current is made[0]
    assert graphs.ready(b, cos) and graphs.current is made[1]
    assert not graphs.ready(c, cos) and not graphs.ready(c, cos)   # a third shape: over the limit, eager
    assert len(made) == 2
    big = GraphSet([], [], None, layer_weights=10 ** 9, only_host_bound=True)
    assert not big.wanted(4096) and GraphSet([], [], None, layer_weights=10 ** 9).wanted(4096)
    assert GraphSet([], [], None, layer_weights=10 ** 6, only_host_bound=True).wanted(4096)


def test_stack_path_with_dropout_over_two_shapes_matches_per_layer():
    """Two batch shapes through one FastLlama's stack path (eager), dropout on: each step the per-layer loss."""
    model = _adapted("llama", dropout=0.2)
    per_layer = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")
    stack = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="eager")
    for seed, batch in enumerate([_batch(), {k: v[:, :12] for k, v in _batch().items()}, _batch()]):
        torch.manual_seed(seed)
        ref = _loss_and_grads(model, per_layer, batch)[0]
        torch.manual_seed(seed)
        assert _loss_and_grads(model, stack, batch)[0] == pytest.approx(ref, rel=1e-6)
    assert len(stack.graphs.by_key) == 2


def test_capture_collects_garbage_first_and_pauses_the_collector(monkeypatch):
    # a collection during a capture may destroy an older CUDA graph and invalidate the capture (graphs.capturing)
    import contextlib
    import gc

    from loraforge.model.fast import graphs

    seen, collected = [], []
    monkeypatch.setattr(graphs.torch.cuda, "graph", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(graphs.gc, "collect", lambda *a: collected.append(1) or 0)
    assert gc.isenabled()
    with graphs.capturing(object(), None):
        seen.append(gc.isenabled())
    assert collected == [1] and seen == [False] and gc.isenabled()
    try:
        with graphs.capturing(object(), None):
            raise RuntimeError("capture failed")
    except RuntimeError:
        pass
    assert gc.isenabled()


def test_kept_gradients_are_the_graph_buffers_of_every_shape():
    """GraphSet.keep_grads (train.flat): the parameters' .grad views become the buffers every shape's backward
    graph adds into, with no per-step zeroing or moving of its own; refused once a shape has graphs."""
    from loraforge.model.fast.graphs import GraphSet
    from loraforge.train.flat import FlatAdamW

    params = [[torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(3))],
              [torch.nn.Parameter(torch.ones(4))]]
    graphs = GraphSet([None, None], params, None, capture=True)
    with pytest.raises(ValueError, match="every adapter parameter's .grad in place"):
        graphs.keep_grads()
    opt = FlatAdamW([p for ps in params for p in ps], lr=0.1)
    graphs.keep_grads()
    a, cos = torch.zeros(2, 8, 4), torch.zeros(1, 8, 2)
    graphs.ready(a, cos)
    made = graphs.current
    assert made.fixed and made.grad_buffers() is graphs.grads
    assert [g.data_ptr() for g in graphs.grads] == [p.grad.data_ptr() for ps in params for p in ps]
    assert graphs.grads[0].data_ptr() == opt.flat.grad.data_ptr()
    with pytest.raises(ValueError, match="before the first step"):
        graphs.keep_grads()


def test_settled_heap_freezes_what_is_alive_and_lets_go_even_on_error():
    import gc

    from loraforge.model.fast.graphs import settled_heap

    assert gc.get_freeze_count() == 0
    with settled_heap():
        assert gc.get_freeze_count() > 10_000            # the libraries, at least
        cycle = []
        cycle.append(cycle)                              # made during the loop: still collectable
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyError), settled_heap():
        raise KeyError("x")
    assert gc.get_freeze_count() == 0


def test_training_loops_run_over_a_settled_heap(tiny_model, tmp_path, monkeypatch):
    import gc

    from conftest import chat_rows, tiny_config, write_jsonl
    from loraforge.train import run as run_module

    seen = []
    real = run_module.train_loop
    monkeypatch.setattr(run_module, "train_loop", lambda *a, **k: seen.append(gc.get_freeze_count()) or real(*a, **k))
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    run_module.run_training(build_config(tiny_config(tiny_model, data, tmp_path / "run", epochs=1)))
    assert len(seen) == 1 and seen[0] > 10_000 and gc.get_freeze_count() == 0
