"""loraforge's batched decoder: token ids of many prompts in, their completions out, greedy or sampled.

Prompts are sorted by length, left-padded into batches and decoded with the KV cache (transformers'
`generate` over whatever model is passed: a PEFT model decodes with its adapter active, so GRPO samples
from the adapter being trained, with no weight copy or server). Decoding stops at the given stop tokens
(the template's end-of-turn); each completion records whether it stopped by itself. Sampling takes a
temperature, top-p and a seed: the same seed gives the same completions (the global RNG is forked, so
training's own random state is untouched). eval.generate (answers for evaluation and `loraforge
generate`) and train's GRPO loop both decode through `decode_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraforge.data.templates import END_OF_TURN
from loraforge.model.attention import decode_attention


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


@torch.no_grad()
def decode_ids(model, prompts: list[list[int]], *, stops: list[int], pad_id: int, max_new_tokens: int = 64,
               batch_size: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               progress=None, cudnn_attention: bool = False) -> list[Completion]:
    """Completions of each prompt (token ids); greedy when temperature is 0. The model is put in eval mode
    while it decodes and given back in the mode it was in."""
    device = next(model.parameters()).device
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
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding: every prompt ends where decoding starts
                    ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[row, width - len(prompts[i]):] = 1
                with decode_attention(device, cudnn_attention):
                    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                                         **_sampling(temperature, top_p))
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
