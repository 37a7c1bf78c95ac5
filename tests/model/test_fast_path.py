"""The fast Llama-family forward (loraforge.model.fast) against PEFT's own forward, on CPU in fp32:
same loss, same LoRA/DoRA gradients, for Llama (GQA, tied head), Qwen2 (q/k/v bias), Qwen3 (q/k norms)
and Mistral shapes; recomputation reproduces dropout masks; a whole run gives the same loss curve."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import chat_rows, tiny_config, write_jsonl
from loraforge.config import LoraSection, build_config
from loraforge.data.templates import IGNORE_INDEX
from loraforge.errors import LoraforgeError
from loraforge.model.adapters import attach_adapter
from loraforge.model.fast import FastLlama, fast_engine, why_not_fast
from loraforge.train.loop import loss_sum, split_model

SHAPE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)


def _model(kind: str):
    import transformers as tr

    cls = {"llama": (tr.LlamaConfig, tr.LlamaForCausalLM), "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM),
           "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM), "mistral": (tr.MistralConfig, tr.MistralForCausalLM)}
    cfg_cls, model_cls = cls[kind]
    extra = {"tie_word_embeddings": kind == "llama"}
    if kind == "qwen3":
        extra["head_dim"] = 16
    if kind == "mistral":
        extra["sliding_window"] = None
    torch.manual_seed(0)
    return model_cls(cfg_cls(**SHAPE, **extra)).float().eval()


def _adapted(kind: str, adapter: str = "lora", dropout: float = 0.0):
    model = attach_adapter(_model(kind), LoraSection(adapter=adapter, r=4, alpha=8, dropout=dropout))
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # PEFT starts B at 0: make the adapter matter
        if "lora_B" in name or "lora_A" in name:
            p.data.normal_(0, 0.2)
        if "magnitude" in name:
            p.data.mul_(1 + 0.1 * torch.randn_like(p))
    model.train()
    return model


def _batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX                      # a prompt without loss
    mask = torch.ones_like(ids)
    for row, n in ((1, 14), (2, 9)):                  # right padding, as collate does
        ids[row, n:], labels[row, n:], mask[row, n:] = 0, IGNORE_INDEX, 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    """Equal up to `tol` relative to the largest entry (fp32 sums in another order differ by ~1e-7)."""
    err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)
    assert err < tol, f"{what}: max error {err:.2e} of the largest entry"


def _loss_and_grads(model, parts, batch):
    model.zero_grad(set_to_none=True)
    s, n = loss_sum(model, batch, parts)
    s.backward()
    return float(s.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("adapter", ["lora", "dora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_fast_loss_and_grads_match_peft(kind, adapter, ckpt):
    model = _adapted(kind, adapter)
    batch = _batch()
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, split_model(model), batch)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=ckpt)
    loss, n, grads = _loss_and_grads(model, fast, batch)
    assert n == ref_n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) >= 14 * (1 + (adapter == "dora"))
    for k in grads:
        _close(grads[k], ref_grads[k], 1e-5, k)


class _Count(TorchDispatchMode):
    """The ATen ops run while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ranks", [None, {"k_proj": 2}], ids=["equal-ranks", "rank-pattern"])
def test_grouped_gradients_reach_grad_without_a_copy_at_r_equal_alpha(ranks):
    """At r = alpha (scale 1, the default) the B gradients of a group (q/k/v, gate/up) are handed to autograd
    as contiguous tensors, which it keeps as .grad: no copy kernel per projection and step. They equal
    PEFT's, also with unequal ranks in a group (which keep the strided slices and autograd's copy)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear",
                                                       rank_pattern=ranks or {}, alpha_pattern=ranks or {}))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.2)
    model.train()
    batch = _batch()
    _, _, ref_grads = _loss_and_grads(model, split_model(model), batch)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")
    model.zero_grad(set_to_none=True)
    loss, _ = fast.loss_sum(batch)
    with _Count() as count:
        loss.backward()
    copies = count.ops.count("aten.copy_.default")
    assert copies == (0 if ranks is None else 3 * 2)   # with a rank pattern: q/k/v's B slices, 2 layers
    for k, p in model.named_parameters():
        if p.requires_grad:
            _close(p.grad, ref_grads[k], 1e-5, k)


def test_recomputation_reuses_the_forwards_thin_products():
    """With checkpointing, the forward without grad keeps each group's x A^T and the recomputation in backward
    takes it instead of multiplying again: one matmul fewer per projection group and layer (4 groups x 2
    layers), the same gradients as PEFT's; a later pass never takes an earlier pass's product."""
    model = _adapted("llama")
    batch = _batch()
    _, _, ref_grads = _loss_and_grads(model, split_model(model), batch)
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True, graphs="off")
    mms = {}
    for keep in (False, True):
        model.zero_grad(set_to_none=True)
        loss, _ = fast.loss_sum(batch)
        fast.state.keep_xa = keep   # as hidden() sets it; False: every group multiplies again
        with _Count() as count:
            loss.backward()
        mms[keep] = sum(op in ("aten.mm.default", "aten.mm.out") for op in count.ops)
        for k, p in model.named_parameters():
            if p.requires_grad:
                _close(p.grad, ref_grads[k], 1e-5, k)
    assert mms[False] - mms[True] == 4 * SHAPE["num_hidden_layers"]
    groups = [g for layer in fast.layers for proj in layer.projections() for _, g, _, _ in proj.parts]
    assert all(g.kept_xa is None for g in groups), "a kept product outlived its recomputation"
    loss, _ = fast.loss_sum(_batch(seed=5))              # kept again by this pass's forward...
    assert all(g.kept_xa is not None for g in groups)
    fast.state.forward_pass += 1                            # ...but a later pass's recomputation multiplies
    model.zero_grad(set_to_none=True)
    with _Count() as count:
        loss.backward()
    assert sum(op in ("aten.mm.default", "aten.mm.out") for op in count.ops) == mms[False]


def test_adapter_update_without_version_bump_reaches_the_next_pass():
    """The fast path casts and stacks the LoRA factors once per forward pass. An update that leaves the
    parameters' version counters alone (as fused and 8-bit optimizers do; here through .data) must still
    show in the next pass: its loss equals PEFT's for the updated adapter."""
    model = _adapted("llama")
    batch = _batch()
    fast = FastLlama(model, dtype=torch.float32, checkpointing=True)
    before = float(fast.loss_sum(batch)[0])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(-1.5)
    after = float(fast.loss_sum(batch)[0])
    ref = float(loss_sum(model, batch, split_model(model))[0])
    assert after == pytest.approx(ref, rel=1e-5)
    assert abs(after - before) > 1e-3 * abs(before)


def test_recomputation_replays_dropout_masks():
    model = _adapted("llama", dropout=0.3)
    batch = _batch()
    torch.manual_seed(5)
    plain = _loss_and_grads(model, FastLlama(model, dtype=torch.float32, checkpointing=False), batch)
    torch.manual_seed(5)
    recomputed = _loss_and_grads(model, FastLlama(model, dtype=torch.float32, checkpointing=True), batch)
    assert recomputed[0] == pytest.approx(plain[0], rel=1e-6)
    for k in plain[2]:
        _close(recomputed[2][k], plain[2][k], 1e-6, k)
    torch.manual_seed(6)  # and dropout is really on: another seed, another loss
    assert _loss_and_grads(model, FastLlama(model, dtype=torch.float32), batch)[0] != pytest.approx(plain[0])


def test_padded_batch_equals_each_example_alone():
    model = _adapted("qwen2")
    model.eval()
    fast = FastLlama(model, dtype=torch.float32)
    batch = _batch()
    with torch.no_grad():
        total, n = fast.loss_sum(batch)
        parts = []
        for row in range(3):
            length = int(batch["attention_mask"][row].sum())
            one = {k: v[row:row + 1, :length] for k, v in batch.items()}
            parts.append(fast.loss_sum(one))
    assert n == sum(p[1] for p in parts)
    assert float(total) == pytest.approx(sum(float(p[0]) for p in parts), rel=1e-5)


def test_unsupported_family_stays_on_the_plain_path():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tiny = GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50, bos_token_id=0, eos_token_id=0)
    model = attach_adapter(GPTNeoXForCausalLM(tiny), LoraSection(r=2, alpha=2))
    assert "gpt_neox" in why_not_fast(model)
    said = []
    assert fast_engine(model, "on", "cpu", torch.float32, False, log=said.append) is None
    assert "plain PEFT path" in said[0] and "gpt_neox" in said[0]
    assert fast_engine(_adapted("llama"), "auto", "cpu", torch.float32, False) is None  # auto = CUDA only
    assert isinstance(fast_engine(_adapted("llama"), "on", "cpu", torch.float32, True), FastLlama)


def test_run_with_fast_path_has_the_plain_loss_curve(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    curves = {}
    for mode in ("off", "on"):
        tree = tiny_config(tiny_model, data, tmp_path / mode, epochs=2, learning_rate=1e-2)
        tree["lora"]["dropout"] = 0.0
        tree["model"] = {"fast_path": mode, "gradient_checkpointing": True}
        build = build_config(tree)
        from loraforge.train.run import run_training

        run_training(build)
        rows = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        curves[mode] = [r["loss"] for r in rows] + [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(curves["on"]) == len(curves["off"]) > 10
    assert curves["on"] == pytest.approx(curves["off"], rel=1e-4)
    assert curves["on"][len(curves["on"]) // 2] < curves["on"][0]


def test_nf4_needs_cuda(tiny_model, tmp_path):
    from loraforge.model.load import load_base

    with pytest.raises(LoraforgeError, match="needs a CUDA GPU"):
        load_base(str(tiny_model), device="cpu", quantization="nf4")


def test_offload_option_parses():
    cfg = build_config({"model": {"gradient_checkpointing": "offload"}})
    assert cfg.model.gradient_checkpointing == "offload"
    assert build_config({"model": {"gradient_checkpointing": True}}).model.gradient_checkpointing is True
    with pytest.raises(LoraforgeError, match="gradient_checkpointing"):
        build_config({"model": {"gradient_checkpointing": "sometimes"}})


def test_live_projections_read_their_modules_at_every_call():
    """Under FSDP2 (`live`) a group reads weights and factors from its modules at each call (FSDP2 swaps the
    tensors in place between calls): the same outputs as a group built once, and a new weight is seen."""
    from loraforge.model.fast.lora import Projections
    from loraforge.model.fast.state import FastState

    model = _adapted("llama")
    attn = model.get_base_model().model.layers[0].self_attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(2, 5, SHAPE["hidden_size"])
    live = Projections(mods, torch.float32, FastState(), live=True)
    ref = [y.detach().clone() for y in live(x)]
    attn.k_proj.base_layer.weight.data = attn.k_proj.base_layer.weight.data * 2
    moved = live(x)
    fixed = Projections(mods, torch.float32, FastState())
    for a, b, c, name in zip(moved, fixed(x), ref, "qkv"):
        _close(a, b, 1e-6, name)
        assert torch.equal(a, c) == (name != "k"), name
