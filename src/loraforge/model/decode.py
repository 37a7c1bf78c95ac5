"""loraforge's batched decoder: token ids of many prompts in, their completions out, greedy or sampled.

Prompts are sorted by length, left-padded into batches and decoded with the KV cache (transformers'
`generate` over whatever model is passed: a PEFT model decodes with its adapter active, so GRPO samples
from the adapter being trained, with no weight copy or server). Decoding stops at the given stop tokens
(the template's end-of-turn); each completion records whether it stopped by itself. Sampling takes a
temperature, top-p and a seed: the same seed gives the same completions (the global RNG is forked, so
training's own random state is untouched). On the CPU a batch's common prompt prefix (the chat template's
system turn) is prefilled once and its KV cache repeated for every row, the rows' padding placed after it.
eval.generate (answers for evaluation and `loraforge generate`) and train's GRPO loop both decode through
`decode_ids`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from loraforge.data.prefix import MIN_TOKENS, shared_length
from loraforge.data.templates import END_OF_TURN
from loraforge.model.adapters import base_of
from loraforge.model.attention import decode_attention
from loraforge.model.fast.decode import fast_generate, why_not as fast_why_not


@dataclass
class Completion:
    ids: list[int]     # the new tokens, up to and without the stop token
    stopped: bool      # ended at a stop token (not cut by max_new_tokens)
    stop_id: int | None = None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN if t in vocab}
    return sorted(ids)


def _sampling(temperature: float, top_p: float) -> dict:
    if temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


# the shortest common prompt prefix worth a prefill of its own: training's bound (data.prefix)
SHARE_MIN = MIN_TOKENS
# the model types whose KV cache the prefix sharing is tested with (a plain per-layer cache, no sliding window)
SHARE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _can_share(model) -> bool:
    cfg = base_of(model).config
    return getattr(cfg, "model_type", None) in SHARE_TYPES and not getattr(cfg, "use_sliding_window", False) \
        and not (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None))


def cache_argument(model) -> str:
    """The forward's (and generate()'s) name for a KV cache: transformers renamed `past_key_values` to `cache`
    (the old name warns, and is removed in 5.40); older 5.x releases know only the old one."""
    base = base_of(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _layout(rows: list[list[int]], pad_id: int, share: int):
    """(input_ids, attention_mask) of a batch: left-padded, every prompt ending where decoding starts; with
    `share` > 0 the common prefix first, then each row's padding, then the rest of its prompt (positions come
    from the mask, so the rest goes on from the prefix as it would without the padding)."""
    width = share + max(len(r) - share for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, prompt in enumerate(rows):
        if share:
            ids[row, :share] = torch.tensor(prompt[:share])
            mask[row, :share] = 1
        rest = prompt[share:]
        ids[row, width - len(rest):] = torch.tensor(rest)
        mask[row, width - len(rest):] = 1
    return ids, mask


@torch.no_grad()
def decode_ids(model, prompts: list[list[int]], *, stops: list[int], pad_id: int, max_new_tokens: int = 64,
               batch_size: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               progress=None, cudnn_attention: bool = False, processors=None,
               share_prefix: bool | None = None, fast=None) -> list[Completion]:
    """Completions of each prompt (token ids); greedy when temperature is 0. The model is put in eval mode
    while it decodes and given back in the mode it was in. `processors(indices)`: the logits processors of
    a batch of these prompts (structured decoding), or None. `share_prefix` (None: on the CPU; Llama, Mistral
    and Qwen models): a batch's common prompt prefix (a chat template's system turn) is prefilled once and its
    KV cache repeated for every row (on the CPU quickstart's validation: 13.9 -> 11.4 s for 77 prompts of ~50
    tokens, 24 shared); the completions are the same. `fast`: the model's FastLlama (model.fast.llama), which
    then decodes on CUDA through model.fast.decode (a static KV cache, one CUDA graph replayed per token) where
    it can and no logits processors are given."""
    device = next(model.parameters()).device
    if fast is not None and (device.type != "cuda" or processors is not None or fast_why_not(fast)):
        fast = None
    share_prefix = (device.type == "cpu" if share_prefix is None else share_prefix) and _can_share(model) \
        and fast is None
    cache_name = cache_argument(model) if share_prefix else None
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                rows = [prompts[i] for i in idx]
                share = shared_length(rows) if share_prefix and len(rows) > 1 else 0
                share = share if share >= SHARE_MIN else 0
                ids, mask = _layout(rows, pad_id, share)
                extra = {} if processors is None else {"logits_processor": processors(idx)}
                with decode_attention(device, cudnn_attention):
                    if share:   # the prefix once (its cache filled in place, no logits wanted), repeated per row
                        cache = DynamicCache()
                        model(input_ids=ids[:1, :share].to(device), use_cache=True, logits_to_keep=1,
                              **{cache_name: cache})
                        cache.batch_repeat_interleave(len(rows))
                        extra[cache_name] = cache
                    if fast is not None:
                        gen = fast_generate(fast, ids, mask, max_new_tokens=max_new_tokens, stops=stops,
                                            temperature=temperature, top_p=top_p)
                    else:
                        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                             max_new_tokens=max_new_tokens, eos_token_id=stops,
                                             pad_token_id=pad_id, **_sampling(temperature, top_p), **extra)
                width = ids.shape[1]
                for row, i in enumerate(idx):
                    toks = gen[row, width:].tolist()
                    cut = next((k for k, t in enumerate(toks) if t in stops), None)
                    out[i] = Completion(toks if cut is None else toks[:cut], cut is not None,
                                        None if cut is None else toks[cut])
                if progress:
                    progress(len(idx))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
