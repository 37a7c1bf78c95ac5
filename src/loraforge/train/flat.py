"""The adapter's parameters and gradients as views of two flat buffers, stepped by AdamW as one tensor.

Why: a LoRA adapter is hundreds of small tensors (420 for SmolLM2-135M at r = 16 on every linear layer), and
the optimizer, the gradient clipping and zero_grad each loop over them on the host. Session 17's H100 profile
of `loraforge train` on the 135M BANKING77 run, whose steps are host-bound, had AdamW's step at 3.1 ms of host
time and the clip's norm at 1.7 ms a step. In isolation (`python bench/optimizer_host.py`): on the H100's host
(fused AdamW) the step 2.24 -> 0.06 ms and the clip 1.62 -> 0.13 ms (bench/results/optimizer_host_h100.json); on
this project's CPU, whose AdamW is the per-tensor loop, the step 15.8 -> 0.11 ms and the clip 1.70 -> 0.08 ms
(tiny tensors: the host part alone, optimizer_host_cpu_tiny.json). What counts, `loraforge train` on that
135M run, did not move beyond the host's noise: 45.9 against 47.4 s of training outside validation and
checkpoints (H100, session 18, bench/results/train_e2e/s18/); nor the CPU quickstart (a ~1.5 s step).

How: every trainable parameter's `.data` becomes a view of one flat buffer and its `.grad` a view of another,
kept for the whole run (zero_grad zeroes the buffer instead of dropping the tensors); autograd adds into
a gradient that exists in place, and the CUDA graphs write into these views (FastLlama.keep_grads). AdamW
sees one parameter. Elementwise it computes what it computes per tensor (tests/train/test_flat.py: the same
weights after steps, to float tolerance). Its state_dict lays the state out per member parameter, as the
per-tensor optimizer's does, so checkpoints resume across both (and on several processes, which keep
per-tensor optimizers: DDP and FSDP2 own their gradients).
"""

from __future__ import annotations

import torch


def can_flatten(params: list[torch.Tensor]) -> bool:
    """One dtype and one device, dense: what one flat buffer can hold."""
    return bool(params) and len({(p.dtype, p.device) for p in params}) == 1 and \
        all(p.layout == torch.strided for p in params)


def stepped_parameters(optimizer) -> list[torch.Tensor]:
    """The tensors the optimizer steps: what gradient clipping should take (FlatAdamW's one flat parameter, whose
    norm is its members' norm, in one kernel and no host loop over them)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class FlatAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over one flat parameter that `params` are views of (see the module docstring)."""

    # state_dict() returns fresh host copies that nothing else holds: train.checkpoint need not copy them again.
    # A background save of the 135M adapter on this project's CPU, isolated (`python bench/checkpoint_save.py
    # --flat`): the training thread waited 114.6 ms with the second copy, 28.6 ms without (per-tensor AdamW:
    # 27.7 ms; bench/results/checkpoint_save_cpu_flat*.json). Not yet timed through `loraforge train` on a GPU.
    state_dict_is_snapshot = True

    def __init__(self, params, **kwargs):
        members = list(params)
        if not can_flatten(members):
            raise ValueError("FlatAdamW needs parameters of one dtype and device")
        total = sum(p.numel() for p in members)
        data = torch.empty(total, dtype=members[0].dtype, device=members[0].device)
        grad = torch.zeros_like(data)
        self.spans = []
        start = 0
        with torch.no_grad():
            for p in members:
                n = p.numel()
                data[start:start + n].copy_(p.reshape(-1))
                if p.grad is not None:
                    grad[start:start + n].copy_(p.grad.reshape(-1))
                p.data = data[start:start + n].view_as(p)
                p.grad = grad[start:start + n].view_as(p)
                self.spans.append((start, n, tuple(p.shape)))
                start += n
        self.flat = torch.nn.Parameter(data)
        self.flat.grad = grad
        super().__init__([self.flat], **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # the members' .grad are views of flat.grad: they stay, zeroed (one kernel)
        self.flat.grad.zero_()

    def _split(self, value) -> list:
        """One value per member: the flat state's slices (views of one host copy, so one device-to-host copy per
        buffer instead of one per member: a checkpoint copies the state to the host anyway), and the step
        count as a tensor of each member's own, as per-tensor AdamW keeps it."""
        if isinstance(value, torch.Tensor) and value.shape == self.flat.shape:
            host = value.detach().to("cpu", copy=True)
            return [host[s:s + n].view(shape) for s, n, shape in self.spans]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            return [value.clone() for _ in self.spans]
        return [value for _ in self.spans]

    def state_dict(self) -> dict:
        """Per member parameter, as torch.optim.AdamW over the members would write it (its tensors in host
        memory: a snapshot, which the loaders move to the parameters' device)."""
        sd = super().state_dict()
        flat_state = sd["state"].get(0, {})
        per = {k: self._split(v) for k, v in flat_state.items()}
        state = {i: {k: v[i] for k, v in per.items()} for i in range(len(self.spans))} if per else {}
        groups = [{**g, "params": list(range(len(self.spans)))} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Reads a per-member state_dict (this class's, or torch.optim.AdamW's over the same parameters)."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.spans):
            raise ValueError(f"the optimizer state has {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} groups; this adapter has {len(self.spans)} in one")
        ids, state = groups[0]["params"], state_dict["state"]
        flat = {}
        for k, v in next((state[i] for i in ids if i in state), {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:   # a member without state (no gradient yet): zeros
                flat[k] = torch.cat([state[i][k].reshape(-1) if i in state else v.new_zeros(n)
                                     for i, (_, n, _) in zip(ids, self.spans)])
            else:   # the step count, the same for every member
                flat[k] = v
        super().load_state_dict({"state": {0: flat} if flat else {},
                                 "param_groups": [{**groups[0], "params": [0]}]})
