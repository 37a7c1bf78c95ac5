"""train.flat: AdamW over the adapter as one flat tensor steps the weights as AdamW over its tensors does, the
members stay views of the flat buffers (zero_grad keeps them), its state_dict is the per-tensor layout both ways,
and a training run with it ends where one without it ends."""

import pytest
import torch

from conftest import tiny_config
from loraforge.config import build_config
from loraforge.train import run as run_mod
from loraforge.train.flat import FlatAdamW, can_flatten
from loraforge.train.run import run_training

SHAPES = [(4, 6), (6, 4), (3,), (5, 2, 2)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _step(opt, params, step, flat):
    for p, g in zip(params, _grads(step)):
        if flat:
            p.grad.add_(g)   # as autograd does with a .grad in place
        else:
            p.grad = g.clone()
    opt.step()
    opt.zero_grad()


def test_flat_steps_like_per_tensor_adamw_and_keeps_views():
    ref, mine = _params(), _params()
    a = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    b = FlatAdamW(mine, lr=1e-2, weight_decay=0.1)
    base = b.flat.data_ptr()
    grad_ptrs = [p.grad.data_ptr() for p in mine]
    for step in range(5):
        _step(a, ref, step, False)
        _step(b, mine, step, True)
    for x, y in zip(ref, mine):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-6, atol=1e-7)
    # members are views of the one buffer, gradients kept (zeroed) in place
    assert [p.grad.data_ptr() for p in mine] == grad_ptrs and all(float(p.grad.abs().sum()) == 0 for p in mine)
    offsets = [(p.data_ptr() - base) // 4 for p in mine]
    assert offsets == [0, 24, 48, 51]
    assert len(b.param_groups[0]["params"]) == 1


@pytest.mark.parametrize("first", ["flat", "per-tensor"])
def test_state_dict_is_per_tensor_and_resumes_either_way(first):
    # two steps in one optimizer, its state_dict into the other kind, three more steps: as five in one
    ref = _params()
    a = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for step in range(5):
        _step(a, ref, step, False)

    params = _params()
    make = {"flat": lambda ps: FlatAdamW(ps, lr=1e-2, weight_decay=0.1),
            "per-tensor": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)}
    second = "per-tensor" if first == "flat" else "flat"
    o1 = make[first](params)
    for step in range(2):
        _step(o1, params, step, first == "flat")
    sd = o1.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2, 3] and sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert sd["state"][1]["exp_avg"].shape == SHAPES[1]
    moved = [torch.nn.Parameter(p.detach().clone()) for p in params]
    o2 = make[second](moved)
    o2.load_state_dict(sd)
    for step in range(2, 5):
        _step(o2, moved, step, second == "flat")
    for x, y in zip(ref, moved):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-6, atol=1e-7)


def test_state_of_another_adapter_is_refused_by_message():
    b = FlatAdamW(_params(), lr=1e-2)
    other = torch.optim.AdamW(_params()[:2], lr=1e-2)
    with pytest.raises(ValueError, match="has 2 parameters in 1 groups; this adapter has 4"):
        b.load_state_dict(other.state_dict())


def test_can_flatten_needs_one_dtype():
    assert can_flatten(_params()) and not can_flatten([]) and \
        not can_flatten([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])


def test_a_run_with_the_flat_optimizer_ends_where_the_per_tensor_one_does(tiny_model, chat_file, tmp_path, monkeypatch):
    tree = lambda out: tiny_config(tiny_model, chat_file, out, num_threads=1, epochs=4, grad_accum=2)  # noqa: E731
    made, real = [], run_mod.make_optimizer
    spy = lambda **over: lambda *a, **k: made.append(real(*a, **{**k, **over})) or made[-1]  # noqa: E731
    monkeypatch.setattr(run_mod, "make_optimizer", spy())   # the default: one process steps it flat
    flat = run_training(build_config(tree(tmp_path / "flat")))
    monkeypatch.setattr(run_mod, "make_optimizer", spy(flat=False))
    plain = run_training(build_config(tree(tmp_path / "plain")))
    assert [type(o) for o in made] == [FlatAdamW, torch.optim.AdamW]
    assert flat.summary["steps"] == plain.summary["steps"] > 4
    assert flat.summary["final_train_loss"] == pytest.approx(plain.summary["final_train_loss"], rel=1e-4)
    assert flat.summary["final_val_loss"] == pytest.approx(plain.summary["final_val_loss"], rel=1e-4)
    for (n1, p1), (n2, p2) in zip(flat.model.named_parameters(), plain.model.named_parameters()):
        if "lora_" in n1:
            assert n1 == n2
            torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-4, atol=1e-5)


def test_state_dict_is_a_snapshot_with_a_step_count_per_member():
    params = _params()
    b = FlatAdamW(params, lr=1e-2)
    _step(b, params, 0, True)
    sd = b.state_dict()
    before = sd["state"][2]["exp_avg"].clone()
    _step(b, params, 1, True)
    assert torch.equal(sd["state"][2]["exp_avg"], before)        # later steps leave it as it was
    assert float(sd["state"][0]["step"]) == 1 and float(b.state_dict()["state"][0]["step"]) == 2
    assert sd["state"][0]["step"] is not sd["state"][1]["step"]  # a per-tensor AdamW adds to each on its own


def test_per_tensor_state_with_a_member_never_stepped_loads_as_zeros():
    # per-tensor AdamW keeps no state for a tensor that never had a gradient: its moments start at zero here
    ref = _params()
    a = torch.optim.AdamW(ref, lr=1e-2)
    for p, g in zip(ref, _grads(0)):
        p.grad = None if p is ref[1] else g
    a.step()
    b = FlatAdamW([torch.nn.Parameter(p.detach().clone()) for p in ref], lr=1e-2)
    b.load_state_dict(a.state_dict())
    back = b.state_dict()["state"]
    assert float(back[1]["exp_avg"].abs().sum()) == 0 and float(back[1]["exp_avg_sq"].abs().sum()) == 0
    torch.testing.assert_close(back[2]["exp_avg"], a.state[ref[2]]["exp_avg"])


def test_a_background_checkpoint_keeps_the_state_of_its_step(tmp_path):
    # save_checkpoint takes FlatAdamW's state_dict as it is (its own host snapshot, not copied again): a step
    # taken while the writer runs must not reach the checkpoint's optimizer state
    from loraforge.train.checkpoint import CheckpointWriter, TrainerState, save_checkpoint

    params = _params()
    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", p)
    model.save_pretrained = lambda out_dir, **kw: out_dir.mkdir(parents=True)   # adapter files: not under test
    opt = FlatAdamW(params, lr=1e-2)
    _step(opt, params, 0, True)
    expected = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    writer = CheckpointWriter()
    path = save_checkpoint(tmp_path / "ck", model, opt, sched, TrainerState(step=1), "x: 1\n", keep_last=2,
                           writer=writer, background=True)
    _step(opt, params, 1, True)   # changes the live flat state, maybe before the writer has read it
    writer.wait()
    saved = torch.load(path / "optimizer.pt", weights_only=False)["state"]
    assert float(opt.state_dict()["state"][0]["step"]) == 2
    for i, state in expected.items():
        for k, v in state.items():
            assert torch.equal(saved[i][k], v), (i, k)
