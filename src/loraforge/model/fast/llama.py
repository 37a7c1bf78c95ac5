"""The fast training forward for Llama-family models (Llama 3.x, Mistral, Qwen2/2.5/3, SmolLM).

FastLlama wraps a PEFT model; it does not change it. It reads the same parameters (frozen base
weights, bf16 or NF4; PEFT's lora_A/lora_B/magnitude) and runs its own forward: fused LoRA projections
(model.fast.lora), liger's RMSNorm/RoPE kernels on CUDA (model.fast.ops), SwiGLU with the adapter's
gate/up term added inside the kernel (model.fast.swiglu_lora), flash attention via SDPA, per-layer
recomputation with the layer input optionally parked in pinned CPU memory (model.fast.recompute), and a
fused linear cross-entropy over the loss positions only. The PEFT model's own forward stays the
reference: tests compare losses and gradients against it.

Batches must be right-padded (loraforge's collate does that): with causal attention a real token
never sees a pad on its right, so no attention mask is needed and the result equals the masked one.
Packed rows carry segment ids; their attention is block-diagonal: torch's varlen flash attention on
CUDA (no work on the masked blocks), an SDPA boolean mask elsewhere.

Under FSDP2 (`sharded=True`) each decoder layer and an untied head run through a method registered on
their module with torch's `register_fsdp_forward_method` (see `attach_fsdp`), so FSDP2 gathers their
parameters before the fast code runs and reduces the adapter's gradients after its backward, exactly as
for the module's own forward; the projections then read their tensors from the modules at every call.
An untied embedding and head are used over their shards (model.fast.vocab_parallel), never gathered.
"""

from __future__ import annotations

import functools

import torch

from loraforge.data.templates import IGNORE_INDEX
from loraforge.model.fast.graphs import StackGraphs
from loraforge.model.fast.lora import Projections
from loraforge.model.fast.ops import (attention, linear_cross_entropy_rows, linear_cross_entropy_sum, packed_attention,
                                      rms_norm, rope, rope_qkv, swiglu)
from loraforge.model.fast.recompute import PinnedPool, recompute
from loraforge.model.fast.vocab_parallel import is_row_sharded, vocab_parallel_ce_sum, vocab_parallel_embedding

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def why_not_fast(model) -> str | None:
    """None if FastLlama can run this (PEFT-wrapped) model, else the reason it cannot."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    kind = getattr(cfg, "model_type", "?")
    if kind not in FAMILIES:
        return f"model type '{kind}' is not one of the fast path's families ({', '.join(FAMILIES)})"
    if getattr(cfg, "mlp_bias", False) or (getattr(cfg, "attention_bias", False) and kind != "qwen2"):
        return "bias in the attention/MLP projections (other than Qwen2's q/k/v) is not on the fast path"
    if getattr(cfg, "use_sliding_window", False) or (kind == "mistral" and getattr(cfg, "sliding_window", None)):
        window = getattr(cfg, "sliding_window", None)
        if window and window < getattr(cfg, "max_position_embeddings", 0):
            return f"sliding-window attention (window {window}) is not on the fast path"
    for m in base.modules():
        if hasattr(m, "lora_A") and len(getattr(m, "active_adapters", ["x"])) > 1:
            return "more than one active adapter"
    return None


class _Layer:
    def __init__(self, layer, dtype, buffers, live=False):
        at, mlp = layer.self_attn, layer.mlp
        self.qkv = Projections([at.q_proj, at.k_proj, at.v_proj], dtype, buffers, live)
        self.o = Projections([at.o_proj], dtype, buffers, live)
        # gate and up as one GEMM whose [gate | up] output the SwiGLU kernel reads in place (and the adapter's
        # term with it: lora.GateUpSwiGLUFn)
        self.gate_up = Projections([mlp.gate_proj, mlp.up_proj], dtype, buffers, live)
        self.down = Projections([mlp.down_proj], dtype, buffers, live)
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(at, "q_norm", None), getattr(at, "k_norm", None)
        self.buffers = buffers
        self.head_dim = at.head_dim
        self.scaling = at.scaling
        self.q_heads = self.qkv.outs[0] // at.head_dim
        self.kv_heads = self.qkv.outs[1] // at.head_dim

    def projections(self):
        return (self.qkv, self.o, self.gate_up, self.down)

    def _qkv(self, x, cos, sin):
        """q (B, Hq, T, D), k and v (B, Hkv, T, D) after RoPE; views of one buffer where possible."""
        bsz, t, _ = x.shape
        heads = [self.q_heads, self.kv_heads, self.kv_heads]
        if self.qkv.joined and self.q_norm is None:
            # its gradient comes from the split below: a new tensor, which RoPE's backward may rotate in place
            qkv = rope_qkv(self.qkv.joined(x), cos, sin, self.q_heads, self.kv_heads, self.head_dim,
                           fresh_grad=True)
            q, k, v = qkv.view(bsz, t, -1, self.head_dim).split(heads, dim=2)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k, v = (y.view(bsz, t, -1, self.head_dim) for y in self.qkv(x))
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
            q = rms_norm(q, self.q_norm.weight, self.q_norm.variance_epsilon)
            k = rms_norm(k, self.k_norm.weight, self.k_norm.variance_epsilon)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        return q, k, v

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packed=None) -> torch.Tensor:
        self.buffers["holds"] = None   # see lora.FrozenGroup._rebuild
        x = rms_norm(h, self.norm1.weight, self.norm1.variance_epsilon)
        q, k, v = self._qkv(x, cos, sin)
        h = self.o.add_to(h, attention(q, k, v, self.scaling, packed))
        x = rms_norm(h, self.norm2.weight, self.norm2.variance_epsilon)
        if self.gate_up.joined:   # the adapter's term added inside the SwiGLU kernel (model.fast.swiglu_lora)
            act = self.gate_up.swiglu(x)
        else:
            act = swiglu(*self.gate_up(x))
        return self.down.add_to(h, act)


def _one_process() -> bool:
    """No other process shares the gradients (DDP reduces them in autograd hooks, which graphs bypass)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


class FastLlama:
    """Training/validation loss of a PEFT Llama-family model through the fast forward."""

    def __init__(self, model, *, dtype: torch.dtype, checkpointing: bool | str = True, sharded: bool = False,
                 graphs: str = "auto"):
        reason = why_not_fast(model)
        if reason:
            raise ValueError(reason)
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = base.model
        self.head = base.get_output_embeddings()
        self.dtype = dtype
        # shared by all projections: the NF4 rebuild buffer, the pass counter, and the largest single
        # projection (a group above it is rebuilt one projection at a time, see lora.FrozenGroup.split)
        self.buffers: dict = {"largest": max(m.in_features * m.out_features for m in self.decoder.layers.modules()
                                             if hasattr(m, "in_features") and not hasattr(m, "base_layer"))}
        self.layers = [_Layer(layer, dtype, self.buffers, live=sharded) for layer in self.decoder.layers]
        self.sharded = sharded
        self.entries: list = []     # FSDP2: each layer's registered method (attach_fsdp)
        self.head_entry = self.embed_entry = None
        self.vocab_parallel = False  # FSDP2: the untied embedding and head used over their shards
        self.checkpointing = bool(checkpointing)
        self.pool = PinnedPool() if checkpointing == "offload" else None
        self.keep_rng = any(getattr(d, "p", 0) > 0 for layer in self.layers
                            for p in layer.projections() for d in p.dropouts)
        # CUDA graphs of the checkpointed stack (model.fast.graphs): "auto" = on CUDA where they apply and
        # the steps are host-bound, "on" = wherever they apply, "eager" = the same stack functions without
        # graphs, on any device (tests), "off" = never
        self.graphs = None
        if graphs != "off" and self.checkpointing and not sharded and not self.keep_rng:
            params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.decoder.layers]
            weights = sum(g.in_features * sum(g.outs) for _, g, _, _ in
                          (part for proj in self.layers[0].projections() for part in proj.parts))
            self.graphs = StackGraphs(self.layers, params, self.pool, capture=graphs != "eager",
                                      layer_weights=weights, only_host_bound=graphs == "auto")

    def hidden(self, input_ids: torch.Tensor, position_ids=None, segment_ids=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, H) in the compute dtype. Packed rows (data.packing) give their
        position_ids and segment_ids: attention then stays inside each example."""
        dev = input_ids.device
        self.buffers["pass"] = self.buffers.get("pass", 0) + 1   # the LoRA factors are cast once per pass
        packed = packed_attention(segment_ids) if segment_ids is not None else None
        with torch.autocast(dev.type, enabled=False):
            h = (self.embed_entry or self.decoder.embed_tokens)(input_ids).to(self.dtype)
            pos = position_ids if position_ids is not None else \
                torch.arange(input_ids.shape[1], device=dev)[None].expand(input_ids.shape[0], -1)
            cos, sin = self.decoder.rotary_emb(h, pos)
            cos, sin = cos.to(self.dtype), sin.to(self.dtype)
            self._recompute = torch.is_grad_enabled() and self.model.training and self.checkpointing
            self.buffers["keep_xa"] = self._recompute   # see lora._thin_product
            if self._recompute and packed is None and self.graphs is not None and \
                    (h.is_cuda or not self.graphs.capture) and _one_process() and self.graphs.ready(h, cos):
                h = self.graphs(h, cos, sin)
            else:
                if self._recompute:
                    h = h.detach().requires_grad_(True)  # so that backward enters the first recomputed layer
                for i in range(len(self.layers)):
                    h = self.entries[i](h, cos, sin, packed) if self.entries else \
                        self._layer(i, h, cos, sin, packed)
            norm = self.decoder.norm
            return rms_norm(h, norm.weight, norm.variance_epsilon)

    def _layer(self, i: int, h, cos, sin, packed):
        layer = self.layers[i]
        if self._recompute:
            return recompute(layer, h, cos, sin, packed, key=i, pool=self.pool, keep_rng=self.keep_rng)
        return layer(h, cos, sin, packed)

    def _head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return linear_cross_entropy_sum(h, self.head.weight, labels)

    def attach_fsdp(self, register) -> None:
        """After FSDP2's fully_shard: run each decoder layer (and an untied head) through a method of its
        module that `register` (torch.distributed.fsdp.register_fsdp_forward_method) wraps in FSDP2's
        pre/post-forward hooks: the gathered weights are in place while the fast code runs, and in backward
        (the recomputation included) FSDP2 gathers again before and reduce-scatters the gradients after."""
        if not self.sharded:
            raise ValueError("attach_fsdp needs a FastLlama built with sharded=True")
        self.entries = []
        for i, module in enumerate(self.decoder.layers):
            module.loraforge_fast = functools.partial(self._layer, i)
            register(module, "loraforge_fast")
            self.entries.append(module.loraforge_fast)
        from torch.distributed.fsdp import FSDPModule

        emb, head = self.decoder.embed_tokens, self.head
        # an untied embedding / head is a group of its own: used over its shards, never gathered whole (a tied
        # pair lives in the root group, gathered for the whole forward and backward)
        if isinstance(emb, FSDPModule) and is_row_sharded(emb.weight) and not emb.weight.requires_grad:
            self.embed_entry = lambda ids: vocab_parallel_embedding(ids, emb.weight)
        if isinstance(head, FSDPModule) and is_row_sharded(head.weight) and not head.weight.requires_grad:
            self.head_entry = self._sharded_head_loss
            self.vocab_parallel = True
        else:
            head.loraforge_fast = self._head_loss
            register(head, "loraforge_fast")   # no-op unless the head is a group of its own
            self.head_entry = head.loraforge_fast

    def _sharded_head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return vocab_parallel_ce_sum(h, self.head.weight, labels)

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the batch's loss tokens, and their count (as train.loop.loss_sum)."""
        labels = batch["labels"][:, 1:]
        # the loss positions, found before the forward is queued: this host-device sync then waits for an
        # idle GPU instead of stalling the CPU in the middle of the step (packed rows add one more, for the
        # longest example, in ops.packed_attention, also before the forward)
        idx = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        h = self.hidden(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"))[:, :-1]
        h = h.reshape(-1, h.shape[-1]).index_select(0, idx)
        return (self.head_entry or self._head_loss)(h, labels.flatten().index_select(0, idx)), len(idx)

    def token_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each loss token, fp32, in row order; the row it belongs to): what preference and
        GRPO objectives read. The head runs over the loss positions only, in recomputed chunks."""
        if self.vocab_parallel:
            raise ValueError("per-token log-probs need the whole head; not with an FSDP2-sharded untied head")
        labels = batch["labels"][:, 1:]
        idx = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        h = self.hidden(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"))[:, :-1]
        h = h.reshape(-1, h.shape[-1]).index_select(0, idx)
        with torch.autocast(h.device.type, enabled=False):
            logp = -linear_cross_entropy_rows(h, self.head.weight, labels.flatten().index_select(0, idx))
        return logp, torch.div(idx, labels.shape[1], rounding_mode="floor")

    def sequence_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-prob of each row's loss tokens (B,), fp32; their count (B,))."""
        logp, rows = self.token_logps(batch)
        n = batch["input_ids"].shape[0]
        return logp.new_zeros(n).index_add(0, rows, logp), torch.bincount(rows, minlength=n)
