"""LoRA and DoRA projections as one autograd function: y = x W^T (+ b) + (xd A^T) (s B)^T.

Why not PEFT's modules: they run the base linear and the adapter as separate modules with their own
autograd nodes, casts and saved tensors, and (for QLoRA) go through bitsandbytes' generic matmul. Here:
  - projections that read the same input (q/k/v, gate/up) run as one group: their frozen weights are
    rebuilt (NF4 -> bf16) into row slices of one reused buffer, so the base product is one GEMM, and
    their LoRA factors are stacked (A) and block-diagonal (s B), so the adapter is two thin GEMMs;
  - the frozen weight is rebuilt right before each use, in forward and again in backward, so no 16-bit
    copy outlives one matmul; the saved tensors are the input and the small (N, r) product only;
  - the LoRA product is written first and the base GEMM accumulates onto it (beta = 1), one pass over
    the output instead of two; gate/up, whose output only SwiGLU reads, skips even that: the base GEMM
    writes alone and the SwiGLU kernel adds the adapter's term (GateUpSwiGLUFn, model.fast.swiglu_lora);
  - with recomputation, the forward's x A^T is kept for the recomputed pass (_thin_product);
  - A and B stay PEFT's fp32 parameters (adapters save and load as PEFT's); they are cast inside and
    their gradients returned in fp32, without extra autograd nodes.
The 16-bit frozen weights of a group are moved once into one tensor of its own (FrozenGroup._fuse_storage:
each PEFT base layer's `weight.data` is re-pointed at its rows; same values, same Parameter objects, so
PEFT's forward, saving and merging see no difference). Under FSDP2 (`live=True`) every tensor is read from
its module at each call (FSDP2 puts the gathered parameter in place before a layer runs and its shard back
after), and weights are never fused into storage of our own. The state shared by every group of the model
(pass number, dropout seed, NF4 rebuild buffer) is the FastState its FastLlama hands in (model.fast.state).
"""

from __future__ import annotations

import itertools
import warnings
from typing import NamedTuple

import torch

from loraforge.model.fast import nf4, nf4_matmul
from loraforge.model.fast.dropout import seeded_dropout
from loraforge.model.fast.state import FastState
from loraforge.model.fast.swiglu_lora import swiglu_lora, swiglu_lora_backward_
from loraforge.model.shard_nf4 import ATTR as NF4_STATE


def quant_state(layer):
    """The bitsandbytes QuantState of an NF4 linear: on its weight, or kept aside by model.shard_nf4 (FSDP2)."""
    return getattr(layer.weight, "quant_state", None) or getattr(layer, NF4_STATE, None)


class FrozenGroup:
    """The frozen base weights (and biases) of projections sharing one input, as one (sum out, in) matrix."""

    def __init__(self, layers: list, dtype: torch.dtype, state: FastState, live: bool = False):
        self.layers = layers
        self.dtype = dtype
        self.state = state
        self.live = live
        self.outs = [lyr.out_features for lyr in layers]
        self.in_features = layers[0].in_features
        self.quantized = quant_state(layers[0]) is not None
        # loraforge's NF4 kernel rebuilds these weights on CUDA (model.fast.nf4); decided once: the states'
        # type and table dtypes never change (FSDP2 keeps the same QuantState objects aside)
        self.nf4_kernel = self.quantized and nf4.have_triton() and all(nf4.handles(quant_state(lyr))
                                                                       for lyr in layers)
        self.stacked = None   # (forward pass number, A stacked, s B block-diagonal): see _stack
        self.fused = None
        self.kept_xa = None   # (forward pass number, xd A^T): see _thin_product
        # the input gradient's order, from the GEMMs' times at Llama-3-8B shapes on an H100 (bench/
        # lora_gemm_orders.py; b_thin_first vs b_base_first in results/train_speed/h100_s9_lora_gemm_orders
        # .json): writing dx with the thin product first and letting the base GEMM accumulate onto it
        # (beta = 1) saves a read and a write of dx: down_proj (in 14336, out 4096) 0.784 vs 0.884 ms, q/k/v
        # 0.337 vs 0.350, o 0.246 vs 0.260; for gate/up (out = 7 x in) the other order is faster (1.463 vs
        # 1.539 ms)
        self.thin_first = sum(self.outs) <= 2 * self.in_features
        self.has_bias = any(lyr.bias is not None for lyr in layers)
        self.bias = None
        self.refresh()
        if not self.quantized and len(layers) > 1 and not live:
            self._fuse_storage()

    def refresh(self) -> None:
        """Read the biases again (FSDP2 swaps the tensors between calls); once, unless `live`."""
        if self.has_bias and (self.live or self.bias is None):
            dev = self.layers[0].weight.device
            self.bias = torch.cat([lyr.bias.detach().to(self.dtype) if lyr.bias is not None else
                                   torch.zeros(o, dtype=self.dtype, device=dev)
                                   for lyr, o in zip(self.layers, self.outs)])

    def _fuse_storage(self) -> None:
        """16-bit base: move the group's weights into one tensor once (each layer's weight becomes a view
        of its rows), so the group's product needs no copy at all."""
        ws = [lyr.weight for lyr in self.layers]
        fused = torch.cat([w.detach() for w in ws])
        start = 0
        for lyr, o in zip(self.layers, self.outs):
            lyr.weight.data = fused[start:start + o]
            start += o
        self.fused = fused

    def get(self) -> torch.Tensor:
        """The group's (sum out, in) weight in the compute dtype (NF4: rebuilt into the shared buffer)."""
        if not self.quantized:
            if len(self.layers) == 1:
                w = self.layers[0].weight
            else:   # unfused (FSDP2): one concatenated copy per use
                w = self.fused if self.fused is not None else torch.cat([lyr.weight for lyr in self.layers])
            return w if w.dtype == self.dtype else w.to(self.dtype)
        return self._rebuild(range(len(self.layers)))

    def _rebuild(self, members) -> torch.Tensor:
        import bitsandbytes.functional as bnbf   # optional dependency (QLoRA only), so imported here

        layers = [self.layers[i] for i in members]
        shape = (sum(lyr.out_features for lyr in layers), self.in_features)
        states = [quant_state(lyr) for lyr in layers]
        qdtype = states[0].dtype
        # one flat buffer shared by every projection of the model (each use is over, in stream order,
        # before the next rebuild writes it)
        flat = self.state.rebuild_buffers.get(qdtype)
        if flat is None or flat.numel() < shape[0] * shape[1]:
            flat = self.state.rebuild_buffers[qdtype] = torch.empty(shape[0] * shape[1], dtype=qdtype,
                                                      device=layers[0].weight.device)
        buf = flat[:shape[0] * shape[1]].view(shape)
        # the buffer still holds these weights (down_proj: rebuilt last in a layer's recomputation and
        # first again in its backward): one rebuild of 21 per layer and step saved. `rebuilt` is cleared at
        # the start of every decoder layer (_Layer), so a skip never spans two layers or a CUDA graph's edge
        held = (id(self), tuple(members), qdtype)
        if not self.live and self.state.rebuilt == held and buf.dtype == self.dtype:
            return buf
        self.state.rebuilt = held
        start = 0
        for lyr, qs in zip(layers, states):
            rows = buf[start:start + lyr.out_features]
            if self.nf4_kernel and rows.is_cuda:   # one launch instead of two bitsandbytes dispatches
                nf4.dequantize_nf4(lyr.weight, qs, rows)
            elif rows.is_cuda:
                bnbf.dequantize_4bit(lyr.weight, qs, out=rows)
            else:  # bitsandbytes' CPU backend has no out= variant (tests run NF4 on CPU)
                rows.copy_(bnbf.dequantize_4bit(lyr.weight, qs))
            start += lyr.out_features
        return buf if buf.dtype == self.dtype else buf.to(self.dtype)

    @property
    def split(self) -> bool:
        """NF4 groups larger than the model's largest single projection (gate + up) are rebuilt one
        projection at a time, so the shared buffer stays the size of one weight (117 MB instead of 235 MB
        for an 8B model); their GEMMs are large enough that two launches cost nothing measurable."""
        return self.quantized and len(self.layers) > 1 and \
            sum(self.outs) * self.in_features > self.state.largest

    def _packed(self, x_flat: torch.Tensor) -> bool:
        """Read the packed NF4 weights (model.fast.nf4_matmul) for this product: a decode step's few rows."""
        return self.nf4_kernel and self.state.decoding and x_flat.shape[0] <= nf4_matmul.ROWS and x_flat.is_cuda \
            and not self.state.packed_failed

    def _packed_parts(self, x_flat: torch.Tensor) -> list[torch.Tensor] | None:
        """x_flat W_i^T (fp32) of each projection from its packed weight, or None: not a decode step's few CUDA
        rows, or the kernel failed to build (warned once; the weights are rebuilt from then on)."""
        if not self._packed(x_flat):
            return None
        try:   # every product first: a kernel that fails to build has changed nothing
            return [nf4_matmul.product(x_flat, lyr.weight, quant_state(lyr), o)
                    for lyr, o in zip(self.layers, self.outs)]
        except (AssertionError, torch.OutOfMemoryError):   # a caller's bug, or memory: not the kernel's build
            raise
        except Exception as e:   # noqa: BLE001 - Triton's build errors have no common type
            self.state.packed_failed = True
            warnings.warn(f"NF4 decoding rebuilds the 16-bit weights: the packed product failed ({str(e)[:200]})",
                          stacklevel=3)
            return None

    def add_product_(self, y: torch.Tensor, x_flat: torch.Tensor, need_w: bool = False) -> torch.Tensor | None:
        """y (N, sum out) += x_flat W^T, the base GEMM accumulating onto y; returns W (None when split, or when
        the product read the packed weights: never where `need_w`)."""
        parts = None if need_w else self._packed_parts(x_flat)
        if parts is not None:
            o0 = 0
            for part, o in zip(parts, self.outs):
                y[:, o0:o0 + o] += part
                o0 += o
            return None
        if not self.split:
            w = self.get()
            y.addmm_(x_flat, w.t())
            return w
        o0 = 0
        for i, o in enumerate(self.outs):
            y[:, o0:o0 + o].addmm_(x_flat, self._rebuild([i]).t())
            o0 += o
        return None

    def product(self, x_flat: torch.Tensor) -> torch.Tensor:
        """x_flat W^T (N, sum out), written by the GEMM alone (beta = 0)."""
        parts = self._packed_parts(x_flat)
        if parts is not None:
            return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).to(x_flat.dtype)
        if not self.split:
            return x_flat @ self.get().t()
        y, o0 = x_flat.new_empty(x_flat.shape[0], sum(self.outs)), 0
        for i, o in enumerate(self.outs):   # beta = 0: the GEMM does not read the uninitialised columns
            y[:, o0:o0 + o].addmm_(x_flat, self._rebuild([i]).t(), beta=0)
            o0 += o
        return y

    def grad_input(self, dy_flat: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """dy_flat (N, sum out) W: the base's share of the input gradient (added to `into` where given)."""
        if not self.split:
            return dy_flat @ self.get() if into is None else into.addmm_(dy_flat, self.get())
        dx, o0 = into, 0
        for i, o in enumerate(self.outs):
            w, d = self._rebuild([i]), dy_flat[:, o0:o0 + o]
            dx = d @ w if dx is None else dx.addmm_(d, w)
            o0 += o
        return dx


def _stack(group: FrozenGroup, factors: tuple, scales: list[float]):
    """The group's A factors stacked and its scaled B factors block-diagonal, in the compute dtype. Built
    once per forward pass of the model: FastLlama.hidden bumps state.forward_pass before each, and the
    parameters cannot change between a forward, its recomputation and its backward, so the three share
    one cast-and-stack (32 ATen ops a layer at r = alpha, 39 otherwise: counted with a dispatch mode on
    a one-layer Llama). Parameter version counters are not a safe key: fused and 8-bit optimizers update
    parameters without bumping them."""
    key = group.state.forward_pass
    cached = group.stacked
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    a = [t.detach().to(group.dtype) for t in factors[0::2]]
    b = [t.detach().to(group.dtype) for t in factors[1::2]]
    b = [t * s if s != 1.0 else t for t, s in zip(b, scales)]
    a_cat, b_blk = (a[0], b[0]) if len(a) == 1 else (torch.cat(a), torch.block_diag(*b))
    group.stacked = (key, a_cat, b_blk)
    return a_cat, b_blk


class LoraGroupFn(torch.autograd.Function):
    """For projections i of a group: y_i = x W_i^T + b_i + s_i (xd A_i^T) B_i^T, concatenated along the
    last dim. Inputs: x, xd (= dropout(x), or x itself), the group, scales, `dora`, `residual`, then A_1,
    B_1, A_2, B_2... With `dora` (one projection) it also returns DoRA's row norms ||W + s B A|| (no
    gradient), from the same rebuilt W, so DoRA costs no extra NF4 rebuild. A `residual` (the decoder's
    stream, for o_proj and down_proj) is added by the adapter's GEMM itself (beta = 1): no separate add
    kernel, no extra (N, H) tensor; its gradient is the incoming one, passed on as it is."""

    @staticmethod
    def forward(ctx, x, xd, group: FrozenGroup, scales: list, dora: bool, residual, *factors):
        lead = x.shape[:-1]
        x_flat = x.reshape(-1, x.shape[-1])
        xd_flat = x_flat if xd is x else xd.reshape(-1, xd.shape[-1])
        a_cat, b_blk = _stack(group, factors, scales)
        # (N, sum r); x needs grad in the recomputation (its input is made to), never in the pass without grad
        xa = _thin_product(group, xd_flat, a_cat, x.requires_grad)
        out = x.new_empty(*lead, b_blk.shape[0])           # returned as allocated (not a view: RoPE may
        y = out.view(-1, out.shape[-1])                    # then rotate it in place)
        if residual is None:
            torch.mm(xa, b_blk.t(), out=y)                 # the adapter's share
        else:                                              # the residual stream + the adapter's share
            torch.addmm(residual.reshape(y.shape), xa, b_blk.t(), out=y)
        if group.bias is not None:
            y += group.bias
        w = group.add_product_(y, x_flat, need_w=dora)         # + x W^T, accumulated by the GEMM itself
        ctx.group, ctx.scales, ctx.same, ctx.lead = group, scales, xd is x, lead
        ctx.residual = residual is not None
        ctx.ranks = [t.shape[0] for t in factors[0::2]]
        ctx.param_dtypes = [t.dtype for t in factors]
        ctx.save_for_backward(xd_flat, xa, a_cat, b_blk)
        if not dora:
            return out
        # DoRA groups hold one projection (never split): w is the weight the base GEMM just used
        norm = torch.linalg.vector_norm(torch.addmm(w, b_blk, a_cat), dim=1, dtype=torch.float32)
        ctx.mark_non_differentiable(norm)
        return out, norm

    @staticmethod
    def backward(ctx, dy, *_):
        xd_flat, xa, a_cat, b_blk = ctx.saved_tensors
        dy_flat = dy.reshape(-1, dy.shape[-1])
        dxa, grads = _adapter_grads(ctx, dy_flat, xd_flat, xa, b_blk)
        dx, dxd = _input_grads(ctx, dy_flat, dxa, a_cat)
        return (dx, dxd, None, None, None, dy if ctx.residual else None, *grads)


class GateUpSwiGLUFn(torch.autograd.Function):
    """h = silu(g) * u for a joined gate/up group, [g | u] = x W^T + (xd A^T)(s B)^T (xd = dropout(x), or x
    itself): the base GEMM writes x W^T alone and the SwiGLU kernel adds the adapter's term
    (model.fast.swiglu_lora). Saves xd, xd A^T and the base output (which the backward overwrites with
    [dg | du]), and x where dropout made xd another tensor; the rest is LoraGroupFn's backward."""

    @staticmethod
    def forward(ctx, x, xd, group: FrozenGroup, scales: list, *factors):
        lead = x.shape[:-1]
        x_flat = x.reshape(-1, x.shape[-1])
        xd_flat = x_flat if xd is x else xd.reshape(-1, xd.shape[-1])
        a_cat, b_blk = _stack(group, factors, scales)
        xa = _thin_product(group, xd_flat, a_cat, x.requires_grad)
        y = group.product(x_flat)
        if group.bias is not None:
            y += group.bias
        ctx.ranks = [t.shape[0] for t in factors[0::2]]
        h = swiglu_lora(y, xa, b_blk, tuple(ctx.ranks))
        ctx.group, ctx.scales, ctx.lead, ctx.same = group, scales, lead, xd is x
        ctx.param_dtypes = [t.dtype for t in factors]
        ctx.save_for_backward(xd_flat, xa, a_cat, b_blk, y)
        return h.view(*lead, h.shape[-1])

    @staticmethod
    def backward(ctx, dh):
        xd_flat, xa, a_cat, b_blk, y = ctx.saved_tensors
        dy_flat = swiglu_lora_backward_(y, xa, b_blk, tuple(ctx.ranks), dh.reshape(-1, dh.shape[-1]))
        dxa, grads = _adapter_grads(ctx, dy_flat, xd_flat, xa, b_blk)
        dx, dxd = _input_grads(ctx, dy_flat, dxa, a_cat)
        return (dx, dxd, None, None, *grads)


def _input_grads(ctx, dy_flat, dxa, a_cat) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dxd) of a group's function: one tensor dx = dy W + (dy B) A where xd is x, else the base's
    share for x and the adapter's for xd (which the dropout's backward takes to x)."""
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None
    if ctx.same:
        return _grad_input(ctx.group, dy_flat, dxa, a_cat).view(*ctx.lead, a_cat.shape[-1]), None
    dx = ctx.group.grad_input(dy_flat).view(*ctx.lead, a_cat.shape[-1])
    return dx, (dxa @ a_cat).view(*ctx.lead, a_cat.shape[-1])


def _adapter_grads(ctx, dy_flat, xd_flat, xa, b_blk) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """dy B (the adapter's share of the input gradient, before A) and the gradients of A_1, B_1, A_2..."""
    dxa = dy_flat @ b_blk                                  # (N, sum r)
    db_blk = dy_flat.t() @ xa                              # (sum out, sum r): the diagonal blocks are used
    # one cast each for all projections (PEFT keeps A and B in fp32); the per-projection gradients are
    # slices of them, scaled only where the scale is not 1 (r = alpha, the default)
    da_cat = (dxa.t() @ xd_flat).to(ctx.param_dtypes[0])   # (sum r, in)
    grads = []
    for da, db, s in zip(da_cat.split(ctx.ranks), _diagonal_blocks(db_blk, ctx.ranks, ctx.group.outs,
                                                                  ctx.param_dtypes[1]), ctx.scales):
        grads += [da, db * s if s != 1.0 else db]
    return dxa, grads


def _grad_input(group: FrozenGroup, dy_flat, dxa, a_cat) -> torch.Tensor:
    """dy W + (dy B) A, (N, in), in the order FrozenGroup.thin_first picks."""
    if group.thin_first:
        return group.grad_input(dy_flat, into=dxa @ a_cat)
    return group.grad_input(dy_flat).addmm_(dxa, a_cat)


def _thin_product(group: FrozenGroup, xd_flat: torch.Tensor, a_cat: torch.Tensor, grad: bool) -> torch.Tensor:
    """xd A^T, computed once per pass where the layers are recomputed: the forward without grad keeps it
    (N x sum r: 0.9 MB a layer for Llama-3-8B at 4,096 tokens) and the recomputation in backward (`grad`)
    takes it instead of reading the input again (the same product of the same bits). FastLlama.hidden sets
    state.keep_xa for checkpointed training passes only (state.forward_pass tells the passes apart)."""
    key = group.state.forward_pass
    kept, group.kept_xa = group.kept_xa, None
    if not group.state.keep_xa:
        return xd_flat @ a_cat.t()
    if grad:
        if kept is not None and kept[0] == key:
            return kept[1]
        return xd_flat @ a_cat.t()
    xa = xd_flat @ a_cat.t()
    group.kept_xa = (key, xa)
    return xa


def _diagonal_blocks(db_blk: torch.Tensor, ranks: list[int], outs: list[int], dtype) -> list[torch.Tensor]:
    """The (out_i, r_i) diagonal blocks of the block gradient, cast to the parameters' dtype, each contiguous
    where the ranks are equal (the usual case): gathered by one cat into a (sum out, r) tensor whose row
    slices they are. A strided slice of the block matrix would do as a gradient, but autograd copies every
    non-contiguous gradient before it keeps it as .grad: one copy kernel per projection and step (160 on an
    8B model, the "Memcpy DtoD" rows of bench/results/train_speed/profiles/s8_8b_ours-lora.txt)."""
    if len(ranks) == 1:
        return [db_blk.to(dtype)]
    spans = list(zip(itertools.accumulate(outs, initial=0), outs, itertools.accumulate(ranks, initial=0), ranks))
    if len(set(ranks)) == 1:
        return list(torch.cat([db_blk[o0:o0 + o, r0:r0 + r] for o0, o, r0, r in spans]).to(dtype).split(outs))
    db_blk = db_blk.to(dtype)
    return [db_blk[o0:o0 + o, r0:r0 + r] for o0, o, r0, r in spans]


class Part(NamedTuple):
    """One group of a Projections: the projections it runs together and what LoraGroupFn needs for them."""
    members: list[int]      # the projections' places in Projections.modules (q, k, v = 0, 1, 2)
    group: FrozenGroup      # their frozen base weights (and biases) as one matrix
    factors: list           # A_1, B_1, A_2, B_2... (PEFT's parameters); empty: a frozen linear, no adapter
    scales: list[float]     # each adapter's scaling (alpha / r)


class Projections:
    """One or more PEFT LoRA/DoRA layers (or plain frozen linears) that read the same input, run through
    LoraGroupFn. Call it with x; it returns the outputs, split per projection."""

    def __init__(self, modules: list, dtype: torch.dtype, state: FastState, live: bool = False, stream: int = 0):
        self.dtype = dtype
        self.state = state
        self.modules, self.live = modules, live
        bases = [getattr(m, "base_layer", m) for m in modules]
        self.adapters = [_adapter(m) for m in modules]
        self.magnitudes = [_magnitude(m, a) for m, a in zip(modules, self.adapters)]
        self.dropouts = [m.lora_dropout[a] if a else None for m, a in zip(modules, self.adapters)]
        groupable = all(self.adapters) and not any(g is not None for g in self.magnitudes) and \
            len({getattr(d, "p", 0) for d in self.dropouts}) == 1
        # DoRA, dropout rates that differ or a projection without adapter: each projection on its own; a
        # group shares one dropout mask (model.fast.dropout), drawn from its own stream
        grouping = [[i] for i in range(len(modules))] if not groupable else [list(range(len(modules)))]
        self.parts: list[Part] = []
        for members in grouping:
            group = FrozenGroup([bases[i] for i in members], dtype, state, live=live)
            scales = [float(modules[i].scaling[self.adapters[i]]) for i in members if self.adapters[i]]
            self.parts.append(Part(members, group, self._factors(members), scales))
        self.streams = {part.members[0]: stream + k for k, part in enumerate(self.parts)}
        self.outs = [b.out_features for b in bases]
        # one group with adapters covering every projection: its output can be taken whole
        self.joined = self._joined if len(self.parts) == 1 and self.parts[0].factors and \
            self.magnitudes[0] is None else None

    def _factors(self, members: list[int]) -> list:
        """A_1, B_1, A_2, B_2... of the projections `members` (the parameters as their modules hold them now)."""
        named = [(self.modules[i], self.adapters[i]) for i in members if self.adapters[i]]
        return [t for m, name in named for t in (m.lora_A[name].weight, m.lora_B[name].weight)]

    def reload(self) -> None:
        """Read every parameter from its module again: under FSDP2 (`live`) before each call, since the
        tensors in place differ between calls (shards outside a layer's forward/backward, gathered inside)."""
        for part in self.parts:   # the same Part and list objects, their contents replaced
            part.factors[:] = self._factors(part.members)
            part.group.refresh()
        self.magnitudes = [_magnitude(m, a) for m, a in zip(self.modules, self.adapters)]

    def _joined(self, x: torch.Tensor) -> torch.Tensor:
        """The group's outputs concatenated along the last dim (one tensor, no split)."""
        if self.live:
            self.reload()
        members, group, factors, scales = self.parts[0]
        return LoraGroupFn.apply(x, self._dropped(members, x), group, scales, False, None, *factors)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a joined gate/up group, the adapter's term added inside SwiGLU (GateUpSwiGLUFn)."""
        if self.live:
            self.reload()
        members, group, factors, scales = self.parts[0]
        return GateUpSwiGLUFn.apply(x, self._dropped(members, x), group, scales, *factors)

    def add_to(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h + this (single) projection of x: the residual added inside the LoRA function where it can be
        (an adapter without DoRA's rescaling), else an add."""
        if self.joined is None or len(self.outs) != 1:
            return h + self(x)[0]
        if self.live:
            self.reload()
        members, group, factors, scales = self.parts[0]
        return LoraGroupFn.apply(x, self._dropped(members, x), group, scales, False, h, *factors)

    def _dropped(self, members: list[int], x: torch.Tensor) -> torch.Tensor:
        """The adapter's input: dropout(x) with the group's mask while training (model.fast.dropout: the
        same mask in the forward, its recomputation and a CUDA graph's replay), else x itself."""
        drop = self.dropouts[members[0]]
        p = getattr(drop, "p", 0) if drop is not None and drop.training else 0
        if not p:
            return x
        # a chunk of rows (model.fast.chunked) draws from a stream of its own, whatever its place
        stream = self.streams[members[0]] + self.state.dropout_rows * 4096
        return seeded_dropout(x, self.state.dropout_seed, stream, p)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.live:
            self.reload()
        outs = []
        for members, group, factors, scales in self.parts:
            if not factors:  # no adapter on this one: a frozen linear
                y = x @ group.get().t()
                outs.append(y + group.bias if group.bias is not None else y)
                continue
            i = members[0]
            xd = self._dropped(members, x)
            if len(members) == 1 and self.magnitudes[i] is not None:
                outs.append(self._dora(x, xd, group, factors, scales, self.magnitudes[i]))
                continue
            y = LoraGroupFn.apply(x, xd, group, scales, False, None, *factors)
            outs.extend(y.split([self.outs[j] for j in members], dim=-1) if len(members) > 1 else [y])
        return outs

    @staticmethod
    def _dora(x, xd, group, factors, scales, magnitude):
        """DoRA: y = b + m / ||W + s B A||_row * (x W^T + s xd A^T B^T); the norm is detached (as in the
        paper and PEFT) and the bias added after the rescaling. With dropout, PEFT also feeds the dropped
        input to the base term of the rescaling; here it does not (identical without dropout)."""
        bias, group.bias = group.bias, None
        try:
            y, norm = LoraGroupFn.apply(x, xd, group, scales, True, None, *factors)
        finally:
            group.bias = bias
        y = y * (magnitude / norm).to(y.dtype)
        return y + bias if bias is not None else y


def _adapter(module) -> str | None:
    if not hasattr(module, "lora_A"):
        return None
    names = [n for n in getattr(module, "active_adapters", list(module.lora_A)) if n in module.lora_A]
    return names[0] if names else None


def _magnitude(module, adapter):
    mags = getattr(module, "lora_magnitude_vector", None)
    return mags[adapter].weight if adapter and mags is not None and adapter in mags else None
