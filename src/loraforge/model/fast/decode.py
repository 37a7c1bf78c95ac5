"""Decoding through the fast path's own layers: a static KV cache, and on CUDA one graph replayed per token.

GRPO samples G completions of up to grpo.max_new_tokens for each prompt from the adapter it trains. Through
transformers' `generate` over the PEFT model each new token of a Llama-3.1-8B-shaped QLoRA model cost ~100 ms
on an H100 (bench/grpo_speed.py, session 22: 111.8 s a GRPO step against 22.9 s for Unsloth + TRL): per token
the host launches PEFT's and bitsandbytes' modules one by one (224 projections, each base + dropout + A + B +
scale + add), grows a DynamicCache by concatenation and runs the logits processors. Here the same model runs
through FastLlama's layers (model.fast.llama: fused q/k/v and gate/up groups, loraforge's NF4 rebuild, the
adapter's term inside the base GEMM, RoPE in place), into a KV cache allocated once for the prompts and all
their new tokens; on CUDA the whole one-token step (embedding, every layer, head, sampling) is captured once
as a CUDA graph and replayed for each following token, so a token costs the GPU's time, not the host's.

Prompts come left-padded (model.decode's layout): slot s of the cache holds the token at column s; row b's
real tokens start at column pad[b]; its position (for RoPE) is s - pad[b]. A query attends to the slots of
its own row from pad[b] up to itself. The grouped-query heads share their key/value head without copies: the
G query heads of a key/value head run as G rows of one attention call. The prompts are prefilled a few rows
at a time, so that their masks stay small however many rows and prompt tokens a batch has.

Sampling is temperature + top-p as transformers' warpers do it (the smallest set of tokens whose probability
reaches top_p), drawn by the exponential-race trick (argmax of p / E with E ~ Exp(1): a sample of p, and
graph-safe: the noise comes from the CUDA generator, whose offsets a replay advances), greedy at temperature
0. The same seed gives the same completions (on CUDA: the graph replays draw from the seeded generator).
Completions equal `generate`'s greedy ones (tests/model/test_fast_decode.py, on a tiny Llama); sampled ones
follow the same distribution, not the same draws.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from loraforge.model.fast.graphs import capturing
from loraforge.model.fast.ops import rms_norm
from loraforge.model.host_embedding import HostEmbedding

CHECK_EVERY = 16   # on CUDA the host reads "has every row stopped?" once per this many tokens (one sync each)
PREFILL_MASK = 2 ** 25   # prompt rows prefilled together: their attention masks (grouped heads x P x P) within this
ROPE_TYPES = ("default", "linear", "llama3", "yarn")   # position tables that do not depend on the length


def why_not(fast) -> str | None:
    """None if this FastLlama can decode here (fast_generate), else why not (then transformers' generate)."""
    if fast.sharded:
        return "an FSDP2-sharded model decodes through its own forward"
    if isinstance(fast.embed_entry or fast.decoder.embed_tokens, HostEmbedding):
        return "the embedding lives in host memory (model.host_embedding)"
    rope = getattr(fast.decoder.rotary_emb, "rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"RoPE type '{rope}' depends on the sequence length"
    return None


def choose(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The next token of each row of logits (B, V): argmax at temperature 0, else a sample of
    softmax(logits / temperature) restricted to the smallest top-p set (as transformers' TopPLogitsWarper:
    a token is dropped when the tokens more likely than it already reach top_p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ranked, order = probs.sort(dim=-1, descending=True)
        ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def _grouped(allowed: torch.Tensor, g: int) -> torch.Tensor:
    """`allowed` (B, 1, T, L) as _attend's G x T query rows see it: (B, 1, G*T, L), built once per forward."""
    bsz, _, t, length = allowed.shape
    return allowed.expand(bsz, g, t, length).reshape(bsz, 1, g * t, length)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q (B, Hq, T, D) over the cache (B, Hkv, L, D) where `mask` (_grouped) is True; returns (B, T, Hq*D).
    The G = Hq / Hkv query heads of a key/value head are G x T rows of one call (head h reads kv head h // G)."""
    bsz, hq, t, d = q.shape
    rows = q.reshape(bsz, keys.shape[1], -1, d)
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scale)
    return out.view(bsz, hq, t, d).transpose(1, 2).reshape(bsz, t, hq * d)


class _Cache:
    """The rows' keys and values for every layer, their prompts' padding and the positions' RoPE tables."""

    def __init__(self, fast, rows: int, length: int, pad: torch.Tensor):
        dev, dt = fast.head.weight.device, fast.dtype
        self.keys = [torch.zeros(rows, lyr.kv_heads, length, lyr.head_dim, dtype=dt, device=dev)
                     for lyr in fast.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.pad = pad
        self.slots = torch.arange(length, device=dev)
        probe = torch.zeros(1, 1, fast.head.weight.shape[1], dtype=dt, device=dev)
        cos, sin = fast.decoder.rotary_emb(probe, self.slots[None])
        self.cos, self.sin = cos[0].to(dt), sin[0].to(dt)   # (L, head_dim): position -> table row


def _forward(fast, cache: _Cache, ids: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor,
             rows: slice = slice(None), span: int | None = None) -> torch.Tensor:
    """The tokens `ids` (B, T) of the cache's `rows` at slots `slots` (T,) through every layer (their keys and
    values written into the cache), attending over the first `span` slots (None: all) where `allowed` (B, 1, T,
    span) says; returns the final-norm hidden state of each row's last token (B, H)."""
    emb = fast.embed_entry or fast.decoder.embed_tokens
    h = emb(ids).to(fast.dtype)
    pad = cache.pad[rows]
    pos = (slots[None, :] - pad[:, None]).clamp(min=0)   # (B, T); a pad's position is never read
    cos, sin = cache.cos[pos], cache.sin[pos]
    mask = _grouped(allowed, fast.layers[0].q_heads // fast.layers[0].kv_heads)
    for layer, keys, values in zip(fast.layers, cache.keys, cache.values):
        layer.state.rebuilt = None   # see lora.FrozenGroup._rebuild
        x = rms_norm(h, layer.norm1.weight, layer.norm1.variance_epsilon)
        q, k, v = layer._qkv(x, cos, sin)
        keys, values = keys[rows], values[rows]   # views: the writes below land in the cache
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
        h = layer.o.add_to(h, _attend(q, keys[:, :, :span], values[:, :, :span], mask, layer.scaling))
        h = layer.mlp(h)
    norm = fast.decoder.norm
    return rms_norm(h[:, -1], norm.weight, norm.variance_epsilon)


def _logits(fast, hidden: torch.Tensor) -> torch.Tensor:
    w = fast.head.weight
    return (hidden.to(w.dtype) @ w.t()).float()


@torch.no_grad()
def fast_generate(fast, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, stops: list[int],
                  temperature: float = 0.0, top_p: float = 1.0, graphs: bool | None = None) -> torch.Tensor:
    """Left-padded prompts `ids` (B, P) with their attention `mask` -> (B, P + n): the prompts and n <=
    max_new_tokens new tokens per row (fewer when every row has met a stop token; a row's tokens after its
    stop are whatever followed, to be cut by the caller). `graphs` (None: on CUDA) replays the one-token step
    as a CUDA graph. The model must be in eval mode (no dropout)."""
    dev = fast.head.weight.device
    ids, mask = ids.to(dev), mask.to(dev)
    graphs = dev.type == "cuda" if graphs is None else graphs
    state = fast.state
    state.forward_pass += 1    # the adapter's stacked factors are cast once for the whole decode (lora._stack)
    state.keep_xa, state.dropout_rows = False, 0
    state.decoding = True      # NF4 products of a step's few rows read the packed weights (model.fast.nf4_matmul)
    try:
        return _generate(fast, ids, mask, max_new_tokens, stops, temperature, top_p, graphs)
    finally:
        state.decoding = False


def _generate(fast, ids, mask, max_new_tokens, stops, temperature, top_p, graphs) -> torch.Tensor:
    """fast_generate's decoding, its inputs on the model's device."""
    dev = ids.device
    bsz, width = ids.shape
    length = width + max_new_tokens
    with torch.autocast(dev.type, enabled=False):
        cache = _Cache(fast, bsz, length, (mask == 0).sum(1))
        out = torch.zeros(bsz, length, dtype=torch.long, device=dev)
        out[:, :width] = ids
        # the prompts, a few rows at a time (their masks, as grouped heads see them, within PREFILL_MASK
        # elements): each query sees its row's real tokens up to itself (a pad sees itself only: never read)
        cols = cache.slots[:width]
        own = torch.eye(width, dtype=torch.bool, device=dev)
        causal = cols[None, :] <= cols[:, None]
        layer = fast.layers[0]
        chunk = max(1, PREFILL_MASK // (layer.q_heads // layer.kv_heads * width * width))
        last = []
        for r0 in range(0, bsz, chunk):
            rows = slice(r0, r0 + chunk)
            seen = causal & (cols[None, None, :] >= cache.pad[rows, None, None]) | own
            last.append(_forward(fast, cache, ids[rows], cols, seen[:, None], rows, width))
        token = choose(_logits(fast, torch.cat(last)), temperature, top_p)
        out[:, width] = token
        stops_t = torch.tensor(sorted(set(stops)) or [-1], dtype=torch.long, device=dev)
        done = (token[:, None] == stops_t).any(-1)
        slot = torch.full((1,), width, dtype=torch.long, device=dev)   # where the last new token goes in

        def step():   # feed the last token at `slot`, write the next one at slot + 1
            seen = (cache.slots[None, :] >= cache.pad[:, None]) & (cache.slots[None, :] <= slot)
            hidden = _forward(fast, cache, token[:, None], slot, seen[:, None, None, :])
            nxt = choose(_logits(fast, hidden), temperature, top_p)
            out.index_copy_(1, slot + 1, nxt[:, None])
            token.copy_(nxt)
            done.logical_or_((nxt[:, None] == stops_t).any(-1))
            slot.add_(1)

        made = 1
        run = step
        while made < max_new_tokens:
            if made % CHECK_EVERY == 1 and bool(done.all()):
                break
            if graphs and run is step and made >= 2:   # the step has run once eagerly: kernels compiled
                run = _captured(step)
                graphs = run is not step
            run()
            made += 1
    return out[:, :width + made]


def _captured(step):
    """`step` as a CUDA graph, once it has run eagerly (its kernels compiled, its buffers allocated): capture
    records its launches without running them; each replay runs one step. `step` itself if the capture fails."""
    graph = torch.cuda.CUDAGraph()
    # model.fast.graphs' capture: thread-local (a checkpoint written by another thread meanwhile does not
    # invalidate it), Python's cyclic collector run before and paused during it (an older graph freed there would)
    try:
        with capturing(graph, None):
            step()
    except RuntimeError as e:   # a capture records and runs nothing: the eager step goes on from the same state
        warnings.warn(f"decoding without a CUDA graph: its capture failed ({str(e)[:200]})", stacklevel=2)
        return step
    return graph.replay
