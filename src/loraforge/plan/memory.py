"""Peak GPU memory of one training step, part by part, from a model shape and a training setup.

    from loraforge.plan import estimate, resolve_shape
    mem = estimate(resolve_shape("llama-3.1-8b"), method="qlora", seq=2048, batch=1)
    mem.total, mem.parts()        # GiB

The model is arithmetic on named constants (below), each with where it comes from; they are first-principles
byte counts for a bf16 Llama-style decoder with SDPA/flash attention (no seq x seq score matrix is kept), and
will be calibrated against GPU measurements in bench/results/. Everything is in GiB (2**30 bytes).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from loraforge.config import ALL_LINEAR as CONFIG_ALL_LINEAR
from loraforge.config import host_embedding_refusal, resolve_optimizer
from loraforge.errors import LoraforgeError
from loraforge.plan.shapes import ModelShape

GIB = 2**30
METHODS = ("full", "lora", "qlora")
STRATEGIES = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
ALL_LINEAR = tuple(CONFIG_ALL_LINEAR)

# --- weights -------------------------------------------------------------------------------------------
BF16 = 2  # bytes per bf16 element: frozen base weights, activations, logits
FP32 = 4  # bytes per fp32 element: LoRA weights and grads (PEFT upcasts adapters of a bf16 base), loss math
# NF4 (QLoRA paper, Dettmers et al. 2023, and bitsandbytes): 4 bits per weight, one 8-bit absmax per block of
# 64 weights (double quantisation), and one fp32 second-level absmax per 256 blocks. Only the linear layers
# of the decoder are quantised; embeddings, lm_head and norms stay bf16.
NF4_BYTES = 0.5
NF4_BLOCK = 64
NF4_ABSMAX_BYTES = 1  # double-quantised absmax (8-bit)
NF4_BLOCK2 = 256
NF4_ABSMAX2_BYTES = 4  # fp32 second-level absmax per 256 blocks
# --- optimizer (bytes per trainable parameter) ---------------------------------------------------------
# AdamW keeps two states (m, v): fp32 = 8 bytes; bitsandbytes 8-bit AdamW = 2 bytes (paged: same on GPU).
ADAM_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
# Full fine-tuning in bf16 mixed precision also keeps an fp32 master copy of every weight (ZeRO paper,
# Rajbhandari et al. 2020: 2 + 2 + 12 bytes/param for weights, grads, master + Adam states).
FULL_MASTER_BYTES = 4
FULL_GRAD_BYTES = BF16
# --- activations (bytes per token per decoder layer, saved for backward) -----------------------------
# Two RMSNorms each save their fp32 upcast input (4 B) and bf16 output (2 B): 12 B x hidden.
ACT_NORM_BYTES = 12
# SDPA/flash saves q, k, v and its output (bf16) plus an fp32 logsumexp per head; o_proj's input is a
# contiguous copy of the output: 2 B x (2*q_dim + 2*kv_dim) + 2 B x q_dim + 4 B x heads.
ACT_ATTN_BYTES = BF16
ACT_LSE_BYTES = 4
# SwiGLU saves gate, up, silu(gate) and silu(gate)*up (bf16): 8 B x intermediate.
ACT_MLP_BYTES = 8
# Full fine-tuning: trained linear layers also save their inputs for weight grads (the two bf16 norm outputs).
ACT_FULL_EXTRA_BYTES = 4
# LoRA with dropout: per targeted module a bool dropout mask (1 B) and the dropped bf16 input (2 B) x in.
ACT_LORA_BYTES = 3
# Gradient checkpointing per decoder layer keeps only each layer's bf16 input, and recomputes one layer.
ACT_CKPT_INPUT_BYTES = BF16
# --- the trainer's fast path (loraforge.model.fast, on CUDA for Llama-family models) ---------------------
# Fused LoRA projections and liger kernels save fewer tensors than PEFT's modules: measured on an H100
# (bench/results/plan_accuracy/), its saved activations per token per layer are 0.71 (Llama-3.2-1B) and
# 0.74 (Llama-3.1-8B) of the count above for the plain path.
FAST_ACT_FRACTION = 0.72
# Backward of one layer holds gradients of its widest tensors (gate/up/SwiGLU, bf16) at once: ~8 B x intermediate
# per token on top of the saved activations (measured with checkpointing, where it is most visible).
FAST_BACKWARD_BYTES = 8
# Long inputs (model.mlp_chunk_tokens, model.fast.chunked; checkpointed fast path only): the MLP runs over chunks
# of tokens, so its saved tensors and its backward's gradients (the two terms above that scale with the
# intermediate size) exist for one chunk; `auto` = chunks of 8,192 tokens beyond 16,384 (the values of
# model.fast.chunked, which tests/plan/test_plan_memory.py checks these against).
MLP_AUTO_CHUNK, MLP_AUTO_FROM = 8192, 16384
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
# What a token costs in a chunked layer's backward, from the code (bf16 unless said): the layer input (loaded
# back), norm1's output, q/k/v, the attention output (saved for the o projection and flash attention), its fp32
# logsumexp per head; the MLP half's input (its memory then holds that half's gradient) and the incoming
# gradient; at the attention backward, the output's gradient, dq/dk/dv and flash attention's fp32 dq accumulator:
# 2 (H + H + (q + 2 kv) + q + H + H + q + (q + 2 kv)) + 4 heads + 4 q bytes = 88 KB a token for Llama-3.1-8B.
FAST_CHUNKED_HIDDEN_BYTES = 2 * 4   # x hidden: layer input, norm1 output, MLP-half input, incoming gradient
FAST_CHUNKED_Q_BYTES = 2 * 2 + 4    # x q_dim: attention output, its gradient (bf16), dq accumulator (fp32)
FAST_CHUNKED_QKV_BYTES = 2 * 2      # x (q_dim + 2 kv_dim): q/k/v and their gradients
# Fused linear cross-entropy never builds the logits: the final hidden states, their copy at the loss positions
# and the gradient it computes in forward (bf16, bf16, bf16, fp32) stay, ~10 B x hidden per token.
FAST_LOSS_BYTES = 10
# --- logits and loss (bytes per token per vocab entry) -------------------------------------------------
# bf16 logits + the loss's fp32 upcast + fp32 log-softmax saved for backward (transformers' ForCausalLMLoss).
LOGITS_BYTES = BF16 + FP32 + FP32
# --- framework ------------------------------------------------------------------------------------------
CUDA_CONTEXT_GIB = 0.6  # CUDA context, cuBLAS/cuDNN workspaces: measured ~0.4-0.8 GiB on recent drivers
# PyTorch caching-allocator fragmentation, as a fraction of everything else: peak reserved exceeded peak allocated
# by 1-9% in the H100 measurements (bench/results/plan_accuracy/).
ALLOCATOR_SLACK = 0.02
# --- several GPUs ---------------------------------------------------------------------------------------
# DDP replicates everything on each GPU and its reducer copies the gradients into communication buckets of the
# same total size (DistributedDataParallel's default gradient_as_bucket_view=False): gradients count twice.
DDP_GRAD_COPIES = 2
# FSDP2 (torch.distributed.fsdp.fully_shard per decoder layer + the root) keeps 1/N of every weight, gradient
# and optimizer state per GPU; it all-gathers a layer's weights for its forward/backward and prefetches the
# next one (2 layers unsharded at a time). An untied embedding and lm_head are groups of their own
# (train.distributed.edge_modules): one of them is gathered at a time, while in use (the fast path never
# gathers them: model.fast.vocab_parallel); a tied pair stays in the root group with the final norm,
# unsharded between forward and backward (the root does not reshard).
FSDP_GATHERED_LAYERS = 2
# Each all-gather lands in a staging buffer of the group's full size and is then copied into the unsharded
# parameters, so the largest group briefly exists twice (torch's _fsdp_collectives: all_gather_output, then
# split_with_sizes_copy): one more full copy of the largest group (the vocab x hidden head of an untied
# model). Measured on 2 x H200 (bench/results/multi_gpu/): Llama-3.1-8B QLoRA, fast path still gathering the
# head, 2 x 2048, offloaded checkpoints: 5.62 GiB allocated per GPU; 4.85 GiB planned without this copy, 5.83
# with it.
FSDP_STAGING_COPIES = 1
# --- objectives other than SFT (config `objective`; train/preference_loop.py, train/grpo_loop.py) ---------
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")
PAIRED = ("dpo", "orpo", "simpo")  # chosen and rejected of each pair in one batch: 2 rows per example
WITH_REFERENCE = ("dpo", "kto")    # a no-grad forward of the base (adapter off; no second weight copy)
# GRPO decodes batch x G rows with transformers' generate (model.decode): a bf16 KV cache of k and v per layer
# for every row's prompt + completion; DynamicCache grows by concatenation, so one layer's cache briefly exists
# twice. The prefill's widest transient (no grad, one layer at a time) is the MLP's gate, up and their product
# (bf16, 6 B x intermediate per prompt token) plus the residual and normed hidden states (4 B x hidden); sampling
# keeps one position's logits per row (bf16 + fp32 logits + fp32 probabilities).
GEN_KV_BYTES = 2 * BF16
GEN_PREFILL_MLP_BYTES, GEN_PREFILL_HIDDEN_BYTES = 6, 4
# The reference forward (train.logprobs.reference_token_logps) runs PEFT's plain forward without gradients: the
# final hidden states and their copy at the loss positions (bf16), one layer's MLP transient, and the head's
# logits at the loss positions with the loss's fp32 copies (LOGITS_BYTES). Preference pairs count every token
# as a loss token (an upper bound: the prompt's tokens are not); GRPO's loss tokens are the completions.
REF_HIDDEN_BYTES = 2 * BF16


@dataclass(frozen=True)
class TrainSetup:
    """What is trained and how: the knobs that change memory and speed (not the dataset size)."""

    method: str = "lora"
    seq: int = 2048
    batch: int = 2
    grad_accum: int = 8
    rank: int = 16
    targets: tuple[str, ...] = ALL_LINEAR
    gradient_checkpointing: bool = False
    optimizer: str = "auto"  # train.optimizer: auto = adamw_8bit for qlora, else adamw (see `optimizer_name`)
    packing: bool = False
    offload: bool = False  # optimizer states (and full fine-tuning's fp32 master weights) live in CPU RAM
    lora_dropout: float = 0.05
    gpus: int = 1  # data-parallel GPUs; `batch` is per GPU
    fast_path: bool = False  # the trainer's fused Llama-family path (its default on CUDA; see setup_from_config)
    offload_checkpoints: bool = False  # fast path: checkpointed layer inputs wait in pinned CPU memory
    strategy: str = "ddp"  # ddp: every GPU holds everything; fsdp: weights, grads and states sharded over gpus
    mlp_chunk_tokens: int | str = "auto"  # fast path with checkpointing: the MLP over this many tokens at a time
    checkpoint_every: int = 1  # fast path with checkpointing: layers recomputed as one span, one input kept per span
    objective: str = "sft"  # sft | dpo | orpo | simpo | kto | grpo; seq: one row (a side; GRPO prompt + completion)
    generations: int = 8    # grpo: completions sampled per prompt (G); batch counts prompts
    completion: int = 256   # grpo: longest completion in tokens (grpo.max_new_tokens)
    reference: bool | None = None  # a no-grad reference forward each step; None: dpo and kto yes, others no
    host_embedding: str = "auto"  # model.host_embedding: an untied input table in host memory (see host_table)

    @property
    def optimizer_name(self) -> str:
        """The optimizer the trainer builds (train.optimizer auto resolved as config.optimizer_of does)."""
        return resolve_optimizer(self.optimizer, self.method == "qlora", self.sharded)

    def host_table(self, shape) -> bool:
        """Whether the input embedding lives in host memory (model.host_embedding; full fine-tuning trains it)."""
        return host_embedding_refusal(self.host_embedding, on_gpu=True, sharded=self.sharded,
                                      frozen=self.method != "full", tied=shape.tied_embeddings,
                                      quantized=self.method == "qlora",
                                      table_bytes=shape.vocab * shape.hidden * BF16) is None

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("optimizer", self.optimizer, ("auto",) + OPTIMIZERS)
        _choice("host_embedding", self.host_embedding, ("auto", "on", "off"))
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("objective", self.objective, OBJECTIVES)
        if self.reference and self.objective not in (*WITH_REFERENCE, "grpo"):
            raise LoraforgeError(f"objective {self.objective} has no reference model",
                                 hint="a reference forward is part of dpo and kto, and of grpo with a KL term")
        for name in ("seq", "batch", "grad_accum", "rank", "gpus", "generations", "completion"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LoraforgeError(f"{name} must be a whole number of at least 1 (got {value!r})")
        object.__setattr__(self, "targets", _expand_targets(self.targets))
        if self.is_lora and not self.targets:
            raise LoraforgeError("targets is empty", hint="name the LoRA modules, e.g. q_proj,v_proj")
        if not 0 <= self.lora_dropout < 1:
            raise LoraforgeError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")

    @property
    def is_lora(self) -> bool:
        return self.method != "full"

    @property
    def fast(self) -> bool:
        """The fast path trains LoRA/QLoRA adapters only (under FSDP2 too: FastLlama.attach_fsdp); full
        fine-tuning always takes the plain path."""
        return self.fast_path and self.is_lora

    @property
    def with_reference(self) -> bool:
        """Whether a step runs the reference's no-grad forward (`reference`, or by default dpo and kto)."""
        return self.objective in WITH_REFERENCE if self.reference is None else self.reference

    @property
    def rows(self) -> int:
        """Sequences per example in a training batch: 2 for a pair, G for a GRPO prompt, else 1."""
        return 2 if self.objective in PAIRED else self.generations if self.objective == "grpo" else 1

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.gpus > 1

    def check(self, shape: ModelShape) -> None:
        """Errors that need the model: unknown target modules, a rank the layers cannot hold."""
        if not self.is_lora:
            return
        dims = shape.linear_dims()
        for t in self.targets:
            if t not in dims:
                close = difflib.get_close_matches(t, list(dims), n=1)
                maybe = f" Did you mean '{close[0]}'?" if close else ""
                raise LoraforgeError(f"unknown target module '{t}'.{maybe}", hint="use any of: " + ", ".join(dims))
        if self.rank > shape.hidden:
            raise LoraforgeError(f"LoRA rank {self.rank} is larger than {shape.name}'s hidden size {shape.hidden}",
                                 hint="use a rank well below the hidden size; 8-64 is usual")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LoraforgeError(f"{name} must be one of {', '.join(allowed)} (got {value!r})")


def _expand_targets(targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = [t.strip() for t in targets if t.strip()]
    if any(t.replace("_", "-") == "all-linear" for t in names):
        return ALL_LINEAR
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak GPU memory in GiB, by part. `total` is their sum; the `activations_*` pair is for comparison."""

    weights: float
    quant_constants: float
    adapters: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    activations_with_checkpointing: float
    activations_without_checkpointing: float
    trainable_params: int
    kv_cache: float = 0.0  # GRPO's generation phase
    phase: str = "training"  # the phase this breakdown is of: the peak among `phases`
    phases: dict[str, float] = field(default_factory=dict)  # total GiB of each phase of a step

    PARTS = ("weights", "quant_constants", "adapters", "gradients", "optimizer", "activations", "logits",
             "kv_cache", "overhead")

    def parts(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.PARTS}

    @property
    def total(self) -> float:
        return sum(self.parts().values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def adapter_params(shape: ModelShape, setup: TrainSetup) -> int:
    """LoRA parameters: r * (in + out) per targeted module per layer."""
    dims = shape.linear_dims()
    return shape.layers * sum(setup.rank * sum(dims[t]) for t in setup.targets)


def _weight_bytes(shape: ModelShape, setup: TrainSetup) -> tuple[float, float]:
    """(weights, quantisation constants) in bytes of the base model on one GPU."""
    other = (shape.embedding_params + shape.norm_params) * BF16
    if setup.host_table(shape):
        other -= shape.vocab * shape.hidden * BF16
    if setup.method != "qlora":
        per_weight, per_const = BF16, 0.0
    else:
        per_weight = NF4_BYTES
        per_const = NF4_ABSMAX_BYTES / NF4_BLOCK + NF4_ABSMAX2_BYTES / (NF4_BLOCK * NF4_BLOCK2)
    weights, consts = shape.linear_params * per_weight + other, shape.linear_params * per_const
    if not setup.sharded:
        return weights, consts
    n = setup.gpus
    layer = shape.layer_linear_params * per_weight
    if setup.fast and not shape.tied_embeddings:
        # the fast path uses an untied embedding and head over their shards (model.fast.vocab_parallel):
        # only decoder layers are ever gathered
        root, largest = shape.norm_params * BF16, layer
    else:
        root = other if shape.tied_embeddings else (shape.vocab * shape.hidden + shape.norm_params) * BF16
        largest = max(layer, shape.vocab * shape.hidden * BF16)
    gathered = FSDP_GATHERED_LAYERS * layer + root * (1 - 1 / n) + FSDP_STAGING_COPIES * largest
    # NF4 quantisation constants are replicated, not sharded (model.shard_nf4 keeps each QuantState on every rank)
    return weights / n + gathered, consts


def activation_bytes_per_token_layer(shape: ModelShape, setup: TrainSetup) -> float:
    """Bytes saved for backward by one decoder layer for one token, without checkpointing."""
    q, kv = shape.q_dim, shape.kv_dim
    total = (ACT_NORM_BYTES * shape.hidden + ACT_ATTN_BYTES * (3 * q + 2 * kv) + ACT_LSE_BYTES * shape.heads
             + ACT_MLP_BYTES * shape.intermediate)
    if not setup.is_lora:
        return total + ACT_FULL_EXTRA_BYTES * shape.hidden
    if setup.lora_dropout > 0:
        dims = shape.linear_dims()
        total += ACT_LORA_BYTES * sum(dims[t][0] for t in setup.targets)
    return total


def mlp_chunk(tokens: int, setting: int | str) -> int:
    """Tokens per MLP chunk of the checkpointed fast path for a batch of `tokens` (0: unchunked), as
    model.fast.chunked.chunk_rows decides from model.mlp_chunk_tokens."""
    if setting == "auto":
        return MLP_AUTO_CHUNK if tokens > MLP_AUTO_FROM else 0
    return int(setting) if setting and tokens > int(setting) else 0


def mlp_chunked_beyond(setup: TrainSetup) -> int | None:
    """The batch size in tokens beyond which `setup` runs its MLP in chunks; None where it never does.
    Memory drops there (fit.py searches each side of it on its own)."""
    if not (setup.fast and setup.gradient_checkpointing) or setup.mlp_chunk_tokens in (0, None):
        return None
    return MLP_AUTO_FROM if setup.mlp_chunk_tokens == "auto" else int(setup.mlp_chunk_tokens)


def _chunked_layer_bytes(shape: ModelShape, setup: TrainSetup, tokens: int, chunk: int) -> float:
    """One checkpointed layer's backward with its MLP in chunks: a per-token part from the code (see
    FAST_CHUNKED_*) and, for one chunk of tokens, the MLP's share of the unchunked estimate."""
    q, kv = shape.q_dim, shape.kv_dim
    per_token = (FAST_CHUNKED_HIDDEN_BYTES * shape.hidden + FAST_CHUNKED_Q_BYTES * q
                 + FAST_CHUNKED_QKV_BYTES * (q + 2 * kv) + ACT_LSE_BYTES * shape.heads)
    mlp = (FAST_ACT_FRACTION * ACT_MLP_BYTES + FAST_BACKWARD_BYTES) * shape.intermediate
    if setup.lora_dropout > 0:   # each adapter's dropped input and mask: attention projections' for all tokens
        dims = shape.linear_dims()
        for t in setup.targets:
            per_token, mlp = (per_token + ACT_LORA_BYTES * dims[t][0], mlp) if t in ATTENTION_PROJ else \
                (per_token, mlp + ACT_LORA_BYTES * dims[t][0])
    return per_token * tokens + mlp * chunk


def _activation_bytes(shape: ModelShape, setup: TrainSetup, checkpointing: bool) -> float:
    tokens = setup.batch * setup.seq
    per_layer = activation_bytes_per_token_layer(shape, setup) * tokens
    chunk = mlp_chunk(tokens, setup.mlp_chunk_tokens)
    if setup.fast and checkpointing:
        # the kept layer inputs (one per span of checkpoint_every layers, none on the GPU when offloaded) and,
        # in a span's backward, its rebuilt inner inputs
        every = setup.checkpoint_every
        spans = 0 if setup.offload_checkpoints else -(-shape.layers // every)
        inputs = (spans + every - 1) * ACT_CKPT_INPUT_BYTES * shape.hidden * tokens
        if chunk:
            return inputs + _chunked_layer_bytes(shape, setup, tokens, chunk)
    if setup.fast:
        per_layer *= FAST_ACT_FRACTION
        backward = FAST_BACKWARD_BYTES * shape.intermediate * tokens
        if not checkpointing:
            return shape.layers * per_layer + backward
        return inputs + per_layer + backward
    if not checkpointing:
        return shape.layers * per_layer
    return shape.layers * ACT_CKPT_INPUT_BYTES * shape.hidden * tokens + per_layer


def estimate(shape: ModelShape, setup: TrainSetup | None = None, **changes: Any) -> MemoryBreakdown:
    """Peak memory of `setup` (default TrainSetup(), with keyword `changes` applied) on `shape`: the largest of
    a step's phases (training; GRPO's generation; the reference forward of dpo/kto or GRPO with KL)."""
    setup = replace(setup or TrainSetup(), **changes) if changes else (setup or TrainSetup())
    setup.check(shape)
    train = _training_phase(shape, replace(setup, batch=setup.batch * setup.rows))
    phases = {"training": train}
    if setup.objective == "grpo":
        phases["generation"] = _generation_phase(shape, setup, train)
    if setup.with_reference:
        phases["reference"] = _reference_phase(shape, setup, train)
    peak = max(phases, key=lambda k: phases[k].total)
    return replace(phases[peak], phase=peak, phases={k: v.total for k, v in phases.items()})


def _with_parts(train: MemoryBreakdown, **parts: float) -> MemoryBreakdown:
    """`train`'s persistent parts (weights, adapters, gradients, optimizer) with other transient parts (GiB)."""
    out = replace(train, **parts)
    model = sum(v for k, v in out.parts().items() if k != "overhead")
    return replace(out, overhead=CUDA_CONTEXT_GIB + ALLOCATOR_SLACK * model)


def _generation_phase(shape: ModelShape, setup: TrainSetup, train: MemoryBreakdown) -> MemoryBreakdown:
    """GRPO's decode of batch x G rows (prompt + completion each), with the training state resident."""
    rows, prompt = setup.batch * setup.generations, max(setup.seq - setup.completion, 0)
    kv = rows * setup.seq * shape.kv_dim * GEN_KV_BYTES * (shape.layers + 1)
    prefill = rows * prompt * (GEN_PREFILL_MLP_BYTES * shape.intermediate + GEN_PREFILL_HIDDEN_BYTES * shape.hidden)
    return _with_parts(train, kv_cache=kv / GIB, activations=prefill / GIB,
                       logits=rows * shape.vocab * LOGITS_BYTES / GIB)


def _reference_phase(shape: ModelShape, setup: TrainSetup, train: MemoryBreakdown) -> MemoryBreakdown:
    """The reference's no-grad forward over a training batch (before the policy's forward)."""
    rows = setup.batch * setup.rows
    tokens = rows * setup.seq
    loss_tokens = rows * min(setup.completion, setup.seq) if setup.objective == "grpo" else tokens
    hidden = tokens * (REF_HIDDEN_BYTES * shape.hidden + GEN_PREFILL_MLP_BYTES * shape.intermediate)
    return _with_parts(train, activations=hidden / GIB, logits=loss_tokens * shape.vocab * LOGITS_BYTES / GIB)


def _training_phase(shape: ModelShape, setup: TrainSetup) -> MemoryBreakdown:
    """Forward + backward of one micro-batch of setup.batch rows of setup.seq tokens (SFT's whole step)."""
    weights, quant = _weight_bytes(shape, setup)
    on_gpu = 0 if setup.offload else 1
    if setup.is_lora:
        trainable = adapter_params(shape, setup)
        adapters, grads = trainable * FP32, trainable * FP32
        optimizer = trainable * ADAM_STATE_BYTES[setup.optimizer_name] * on_gpu
    else:
        trainable = shape.params
        adapters, grads = 0, trainable * FULL_GRAD_BYTES
        optimizer = trainable * (FULL_MASTER_BYTES + ADAM_STATE_BYTES[setup.optimizer_name]) * on_gpu
    if setup.sharded:
        adapters, grads, optimizer = adapters / setup.gpus, grads / setup.gpus, optimizer / setup.gpus
    elif setup.gpus > 1:
        grads *= DDP_GRAD_COPIES
    with_ckpt = _activation_bytes(shape, setup, True)
    without = _activation_bytes(shape, setup, False)
    activations = with_ckpt if setup.gradient_checkpointing else without
    if setup.fast:
        logits = setup.batch * setup.seq * shape.hidden * FAST_LOSS_BYTES
    else:  # GRPO's head runs at the completion tokens only (train.logprobs); SFT's count stays as calibrated
        loss_tokens = min(setup.completion, setup.seq) if setup.objective == "grpo" else setup.seq
        logits = setup.batch * loss_tokens * shape.vocab * LOGITS_BYTES
    model_bytes = weights + quant + adapters + grads + optimizer + activations + logits
    overhead = CUDA_CONTEXT_GIB * GIB + ALLOCATOR_SLACK * model_bytes
    return MemoryBreakdown(
        weights=weights / GIB, quant_constants=quant / GIB, adapters=adapters / GIB, gradients=grads / GIB,
        optimizer=optimizer / GIB, activations=activations / GIB, logits=logits / GIB, overhead=overhead / GIB,
        activations_with_checkpointing=with_ckpt / GIB, activations_without_checkpointing=without / GIB,
        trainable_params=trainable,
    )
