"""The fast training forward for Llama-family models (Llama 3.x, Mistral, Qwen2/2.5/3, SmolLM).

FastLlama wraps a PEFT model and reads the same parameters (frozen base weights, bf16 or NF4; PEFT's
lora_A/lora_B/magnitude); it changes no value and no parameter object, and the PEFT forward still gives
the same results. One thing it does change is where the 16-bit base weights live: the frozen weights of
projections that share an input (q/k/v, gate/up) are moved into one tensor, each module's weight `.data`
re-pointed at its rows (model.fast.lora.FrozenGroup._fuse_storage; not under FSDP2 nor for NF4). It runs
its own forward: fused LoRA projections (model.fast.lora), liger's RMSNorm/RoPE kernels on CUDA
(model.fast.ops), SwiGLU with the adapter's gate/up term added inside the kernel (model.fast.swiglu_lora),
flash attention via SDPA, per-layer recomputation with the layer input optionally parked in pinned CPU
memory (model.fast.recompute; or one input per span of layers), and a fused linear cross-entropy over
the loss positions only. On long inputs each layer's MLP runs over chunks of tokens (model.fast.chunked).
RoPE takes the model's own rotary tables (every rope_type transformers computes; a model whose tables the
kernels cannot take stays on PEFT's path). The PEFT model's own forward stays the reference: tests compare
losses and gradients against it. The state its layers and projections share (pass number, dropout seed,
NF4 rebuild buffers) is one FastState (model.fast.state), created here and handed to each of them.

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
from loraforge.model.adapters import base_of
from loraforge.model.fast.chunked import chunk_rows, mlp_backward_chunked, mlp_forward_chunked
from loraforge.model.fast.dropout import new_seed, reseed_
from loraforge.model.fast.graphs import GraphSet
from loraforge.model.host_embedding import HostEmbedding
from loraforge.model.fast.lora import Projections
from loraforge.model.fast.ops import (attention, linear_cross_entropy_sum, linear_logp_rows, packed_attention,
                                      rms_norm, rope, rope_qkv, swiglu)
from loraforge.model.fast.recompute import PinnedPool, Span, recompute
from loraforge.model.fast.state import FastState
from loraforge.model.fast.vocab_parallel import is_row_sharded, vocab_parallel_ce_sum, vocab_parallel_embedding

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def why_not_fast(model) -> str | None:
    """None if FastLlama can run this (PEFT-wrapped) model, else the reason it cannot."""
    base = base_of(model)
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
    return _rope_reason(base)


def _rope_reason(base) -> str | None:
    """The fast path rotates with the tables of the model's own rotary embedding (any rope_type transformers
    computes: llama3, yarn, linear, dynamic...); its kernels need them (T, head_dim) with equal halves."""
    rot, layer = getattr(base.model, "rotary_emb", None), base.model.layers[0].self_attn
    if rot is None:
        return "the model has no shared rotary embedding (model.rotary_emb)"
    dev = next(iter(rot.buffers()), torch.empty(0)).device
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32, device=dev), torch.arange(2, device=dev)[None])
    half = layer.head_dim // 2
    if cos.shape[-1] != layer.head_dim or not torch.equal(cos[..., :half], cos[..., half:]):
        kind = (getattr(base.config, "rope_parameters", None) or {}).get("rope_type", "?")
        return f"its rotary embedding (rope_type '{kind}') is not a full rotate-half RoPE over each head"
    return None


class _Layer:
    def __init__(self, layer, dtype, state: FastState, live=False, index=0):
        at, mlp = layer.self_attn, layer.mlp
        first = 16 * index   # each group's dropout stream (model.fast.dropout): 4 groups of at most 3 projections
        self.qkv = Projections([at.q_proj, at.k_proj, at.v_proj], dtype, state, live, stream=first)
        self.o = Projections([at.o_proj], dtype, state, live, stream=first + 4)
        # gate and up as one GEMM whose [gate | up] output the SwiGLU kernel reads in place (and the adapter's
        # term with it: lora.GateUpSwiGLUFn)
        self.gate_up = Projections([mlp.gate_proj, mlp.up_proj], dtype, state, live, stream=first + 8)
        self.down = Projections([mlp.down_proj], dtype, state, live, stream=first + 12)
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(at, "q_norm", None), getattr(at, "k_norm", None)
        self.state = state
        self.head_dim = at.head_dim
        self.scaling = at.scaling
        self.q_heads = self.qkv.outs[0] // at.head_dim
        self.kv_heads = self.qkv.outs[1] // at.head_dim
        self.mlp_chunk: int | str = 0   # model.mlp_chunk_tokens (FastLlama sets it)

    def projections(self):
        return (self.qkv, self.o, self.gate_up, self.down)

    def _qkv(self, x, cos, sin):
        """q (B, Hq, T, head_dim), k and v (B, Hkv, T, head_dim) after RoPE; views of one buffer where possible."""
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

    def attn(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packed=None) -> torch.Tensor:
        """h + attention(norm1(h)): the layer's first half."""
        self.state.rebuilt = None   # see lora.FrozenGroup._rebuild
        x = rms_norm(h, self.norm1.weight, self.norm1.variance_epsilon)
        q, k, v = self._qkv(x, cos, sin)
        return self.o.add_to(h, attention(q, k, v, self.scaling, packed))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """h + MLP(norm2(h)): the second half, per token (model.fast.chunked runs it on row chunks)."""
        x = rms_norm(h, self.norm2.weight, self.norm2.variance_epsilon)
        if self.gate_up.joined:   # the adapter's term added inside the SwiGLU kernel (model.fast.swiglu_lora)
            act = self.gate_up.swiglu(x)
        else:
            act = swiglu(*self.gate_up(x))
        return self.down.add_to(h, act)

    def rows(self, h: torch.Tensor) -> int:
        """Tokens per MLP chunk for this batch (0: the MLP runs whole)."""
        return chunk_rows(h.shape[0] * h.shape[1], self.mlp_chunk)

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packed=None) -> torch.Tensor:
        h = self.attn(h, cos, sin, packed)
        rows = self.rows(h)
        if rows and not torch.is_grad_enabled():
            return mlp_forward_chunked(self.mlp, h, rows, self.state)
        return self.mlp(h)

    def backward_through(self, h: torch.Tensor, grad: torch.Tensor, cos, sin, packed=None) -> None:
        """Recompute the layer from its input h (a leaf with grad) and back-propagate `grad` into h.grad and
        the adapter's .grad (model.fast.recompute); the MLP one chunk at a time where rows() says so."""
        rows = self.rows(h)
        if not rows:
            torch.autograd.backward(self(h, cos, sin, packed), grad)
            return
        mid = self.attn(h, cos, sin, packed)
        torch.autograd.backward(mid, mlp_backward_chunked(self.mlp, mid, grad, rows, self.state))


def _one_process() -> bool:
    """No other process shares the gradients (DDP reduces them in autograd hooks, which graphs bypass)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


class FastLlama:
    """Training/validation loss of a PEFT Llama-family model through the fast forward."""

    def __init__(self, model, *, dtype: torch.dtype, checkpointing: bool | str = True, sharded: bool = False,
                 graphs: str = "auto", mlp_chunk_tokens: int | str = "auto", checkpoint_every: int = 1):
        reason = why_not_fast(model)
        if reason:
            raise ValueError(reason)
        self.model = model
        base = base_of(model)
        self.decoder = base.model
        self.head = base.get_output_embeddings()
        self.dtype = dtype
        # shared by all layers and projections (model.fast.state): the pass counter, the dropout seed, the NF4
        # rebuild buffers and the largest single projection (a group above it is rebuilt one projection at a
        # time, see lora.FrozenGroup.split); one object for the FastLlama's life
        largest = max(m.in_features * m.out_features for m in self.decoder.layers.modules()
                      if hasattr(m, "in_features") and not hasattr(m, "base_layer"))
        self.state = FastState(largest=largest, dropout_seed=new_seed(self.head.weight.device))
        self.layers = [_Layer(layer, dtype, self.state, live=sharded, index=i)
                       for i, layer in enumerate(self.decoder.layers)]
        for layer in self.layers:   # long inputs: the MLP one chunk of tokens at a time (model.fast.chunked)
            layer.mlp_chunk = mlp_chunk_tokens
        self.sharded = sharded
        self.entries: list = []     # FSDP2: each layer's registered method (attach_fsdp)
        self.head_entry = self.embed_entry = None
        self.vocab_parallel = False  # FSDP2: the untied embedding and head used over their shards
        self.checkpointing = bool(checkpointing)
        self.pool = PinnedPool() if checkpointing == "offload" else None
        # the LoRA dropout masks are functions of state.dropout_seed (model.fast.dropout), refilled before
        # each training forward: a recomputed layer and a graph's replay draw the same masks, no RNG state kept
        self.dropout = any(getattr(d, "p", 0) > 0 for layer in self.layers
                           for p in layer.projections() for d in p.dropouts)
        # model.checkpoint_every: n layers checkpointed as one (recompute.Span), 1/n of the kept inputs
        every = checkpoint_every if self.checkpointing and not sharded else 1
        self.spans = [Span(self.layers[i:i + every]) for i in range(0, len(self.layers), every)] \
            if every > 1 else None
        # CUDA graphs of the checkpointed stack (model.fast.graphs): "auto" = on CUDA where they apply and
        # the steps are host-bound, "on" = wherever they apply, "eager" = the same stack functions without
        # graphs, on any device (tests), "off" = never. Without checkpointing too: the graphed stack
        # recomputes each layer in its backward, which costs a forward's GEMMs again but holds less memory,
        # and where the graphs apply (`auto`: small, host-bound steps) the launches they save weigh more
        self.graphs = None
        if graphs != "off" and not sharded and self.spans is None:
            params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.decoder.layers]
            weights = sum(part.group.in_features * sum(part.group.outs)
                          for proj in self.layers[0].projections() for part in proj.parts)
            self.graphs = GraphSet(self.layers, params, self.pool, capture=graphs != "eager", layer_weights=weights,
                                   only_host_bound=graphs == "auto")

    def hidden(self, input_ids: torch.Tensor, position_ids=None, segment_ids=None, cu_seqlens=None,
               shared_prefix: bool = False, host_ids=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, H) in the compute dtype. Packed rows (data.packing) give their
        position_ids and segment_ids (and the collate's cu_seqlens): attention then stays inside each example
        (and its row's shared prefix: data.prefix)."""
        dev = input_ids.device
        self.state.forward_pass += 1   # the LoRA factors are cast once per pass
        training = torch.is_grad_enabled() and self.model.training
        if training and self.dropout:
            seed = self.state.dropout_seed
            if seed.device != dev:
                seed = self.state.dropout_seed = new_seed(dev)
            reseed_(seed)
        packed = packed_attention(segment_ids, cu_seqlens, shared_prefix) if segment_ids is not None else None
        with torch.autocast(dev.type, enabled=False):
            emb = self.embed_entry or self.decoder.embed_tokens
            # model.host_embedding: the rows gathered from the batch's host copy of the ids (no sync)
            h = (emb(input_ids, host_ids) if isinstance(emb, HostEmbedding) else emb(input_ids)).to(self.dtype)
            pos = position_ids if position_ids is not None else \
                torch.arange(input_ids.shape[1], device=dev)[None].expand(input_ids.shape[0], -1)
            cos, sin = self.decoder.rotary_emb(h, pos)
            cos, sin = cos.to(self.dtype), sin.to(self.dtype)
            # the graphs' backward recomputes whole layers: not for batches whose MLP runs in chunks; packed rows
            # only with host-computed offsets (ops.packed_attention) or without capture (tests on CPU)
            replayable = self.graphs is not None and (packed is None or not self.graphs.capture or
                                                      (packed[0] == "varlen" and cu_seqlens is not None))
            graphed = training and replayable and not self.layers[0].rows(h) and \
                (h.is_cuda or not self.graphs.capture) and _one_process() and self.graphs.ready(h, cos, packed)
            self._recompute = training and self.checkpointing
            self.state.keep_xa = self._recompute or graphed   # see lora._thin_product
            if graphed:
                h = self.graphs(h, cos, sin, packed)
            else:
                if self._recompute:
                    h = h.detach().requires_grad_(True)  # so that backward enters the first recomputed layer
                if self._recompute and self.spans:
                    for i, span in enumerate(self.spans):
                        h = recompute(span, h, cos, sin, packed, key=i, pool=self.pool)
                else:
                    for i in range(len(self.layers)):
                        h = self.entries[i](h, cos, sin, packed) if self.entries else \
                            self._layer(i, h, cos, sin, packed)
            norm = self.decoder.norm
            return rms_norm(h, norm.weight, norm.variance_epsilon)

    def fit_graphs(self, tokens: int) -> bool:
        """Given the run's largest training batch (`tokens` tokens), whether its batches should come in a few
        padded lengths (data.batching's buckets): CUDA graphs then replay for every batch after its length's
        first two steps. Under model.cuda_graphs auto a run has graphs for all its batches or none: where the
        largest is not host-bound the graphs are dropped, since a pool captured for the short batches is held
        beside the eager peak of the long ones (8B QLoRA at 2 x 2,048: 0.79 GiB more reserved, session 16's
        allocator history in bench/results/train_e2e/s16/)."""
        if self.graphs is not None and self.graphs.only_host_bound and not self.graphs.wanted(tokens):
            self.graphs = None
        return self.graphs is not None and self.graphs.wanted(tokens) and _one_process() and \
            self.head.weight.is_cuda

    def keep_grads(self) -> None:
        """The adapter's .grad tensors now stay in place for the whole run, zeroed rather than dropped between
        steps (train.flat): the graphs' backward adds into them instead of into buffers of its own."""
        if self.graphs is not None:
            self.graphs.keep_grads()

    def _layer(self, i: int, h, cos, sin, packed):
        layer = self.layers[i]
        if self._recompute:
            return recompute(layer, h, cos, sin, packed, key=i, pool=self.pool)
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
        # imported here: torch.distributed.fsdp takes ~2 s to import (measured on CPU torch 2.13), paid only by
        # FSDP2 runs
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

    def _loss_rows(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final hidden states at the loss positions (N, H), their labels (N,), the flat positions (N,)) of a
        batch, each position predicting the next token."""
        labels = batch["labels"][:, 1:]
        # the loss positions: found on the host by the training loop (`loss_index`, no sync), else found here
        # before the forward is queued, so that this host-device sync waits for an idle GPU instead of
        # stalling the CPU in the middle of the step (packed rows without the collate's cu_seqlens add one more,
        # for the longest example, in ops.packed_attention, also before the forward)
        idx = batch.get("loss_index")
        if idx is None:
            idx = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        h = self.hidden(batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"),
                        batch.get("cu_seqlens"), batch.get("shared_prefix", False), batch.get("host_input_ids"))[:, :-1]
        return h.reshape(-1, h.shape[-1]).index_select(0, idx), labels.flatten().index_select(0, idx), idx

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the batch's loss tokens, and their count (as train.loop.loss_sum)."""
        h, y, idx = self._loss_rows(batch)
        return (self.head_entry or self._head_loss)(h, y), len(idx)

    def token_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each loss token, fp32, in row order; the row it belongs to): what preference and
        GRPO objectives read. The head runs over the loss positions only, in recomputed chunks."""
        if self.vocab_parallel:
            raise ValueError("per-token log-probs need the whole head; not with an FSDP2-sharded untied head")
        h, y, idx = self._loss_rows(batch)
        with torch.autocast(h.device.type, enabled=False):
            logp = linear_logp_rows(h, self.head.weight, y)
        return logp, torch.div(idx, batch["labels"].shape[1] - 1, rounding_mode="floor")

    def sequence_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-prob of each row's loss tokens (B,), fp32; their count (B,))."""
        logp, rows = self.token_logps(batch)
        n = batch["input_ids"].shape[0]
        return logp.new_zeros(n).index_add(0, rows, logp), torch.bincount(rows, minlength=n)
