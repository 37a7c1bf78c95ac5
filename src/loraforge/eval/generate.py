"""Batched generation for evaluation and for `loraforge generate` / `loraforge chat`.

Prompts are rendered with the model's chat template and decoded greedily by model.decode's batched decoder
(the one GRPO samples with: length-sorted, left-padded batches, a common prompt prefix prefilled once on the
CPU), with a grammar's logits processor for structured decoding, stopping at the template's end-of-turn
token. Each answer records whether the model stopped by itself (a model that never stops is reported).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from threading import Thread

from loraforge.data.templates import prompt_text
from loraforge.eval.structured import GrammarLogitsProcessor, compile_structure
from loraforge.model.adapters import load_adapter
from loraforge.model.attention import decode_attention
from loraforge.model.decode import END_OF_TURN, decode_ids, stop_token_ids
from loraforge.model.load import load_base, pick_device
from loraforge.train.run_files import RunFiles

__all__ = ["END_OF_TURN", "Generation", "InferenceHandle", "build_messages", "generate_batch", "stop_token_ids"]


@dataclass
class Generation:
    text: str
    stopped: bool      # ended at an end-of-turn token (not cut by max_new_tokens)
    new_tokens: int


@dataclass
class InferenceHandle:
    model: object
    tokenizer: object
    system: str | None = None


def build_messages(prompt: str | list[dict], system: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def generate_batch(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 64,
                   batch_size: int = 32, progress=None, cudnn_attention: bool = False,
                   grammar=None) -> list[Generation]:
    """Greedy answers to each conversation (its last assistant turn, if any, is left out), through
    model.decode's batched decoder. With `grammar` (loraforge.eval.structured.compile_structure) each row
    decodes only tokens its grammar permits."""
    prompts = tokenizer([prompt_text(tokenizer, c) for c in conversations], add_special_tokens=False)["input_ids"]
    processors = None
    if grammar is not None:
        from transformers import LogitsProcessorList  # lazy: transformers' generation utils take ~1 s

        def processors(idx):
            return LogitsProcessorList([GrammarLogitsProcessor([grammar.start() for _ in idx])])
    done = decode_ids(model, prompts, stops=stop_token_ids(tokenizer, model), pad_id=tokenizer.pad_token_id,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                      cudnn_attention=cudnn_attention, processors=processors)
    return [Generation(tokenizer.decode(c.ids, skip_special_tokens=True).strip(), c.stopped, len(c.ids))
            for c in done]


def load_for_inference(name: str) -> InferenceHandle:
    """A run folder (base + its adapter), an adapter folder, or a bare base model."""
    path = Path(name)
    device = pick_device("auto")
    if RunFiles.adapter_in(path) is None:
        model, tok, _ = load_base(name, device=device)
        return InferenceHandle(model, tok)
    files = RunFiles.find(path)
    model, tok, _ = load_base(files.base_model, device=device)
    system = (files.run_config.get("data") or {}).get("system_prompt")
    return InferenceHandle(load_adapter(model, files.adapter_dir), tok, system)


def generate_answers(handle: InferenceHandle, prompts: list[str], *, system: str | None = None,
                     max_new_tokens: int = 128, structure=None) -> list[str]:
    """Greedy answers; with a `structure` (eval.structured.Structure) only valid ones."""
    convs = [build_messages(p, system or handle.system) for p in prompts]
    grammar = None
    if structure is not None:
        grammar = compile_structure(handle.tokenizer, structure, stop_token_ids(handle.tokenizer, handle.model))
    return [g.text for g in generate_batch(handle.model, handle.tokenizer, convs, max_new_tokens=max_new_tokens,
                                           grammar=grammar)]


def chat_loop(handle: InferenceHandle, *, system: str | None = None, max_new_tokens: int = 256) -> None:
    """Interactive chat; answers stream token by token. Empty line or Ctrl-D ends it."""
    from transformers import TextIteratorStreamer  # lazy, as LogitsProcessorList above

    tok, model = handle.tokenizer, handle.model
    system = system or handle.system
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    stops = stop_token_ids(tok, model)
    device = next(model.parameters()).device
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        history.append({"role": "user", "content": user})
        enc = tok(prompt_text(tok, history), return_tensors="pt", add_special_tokens=False).to(device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                      pad_token_id=tok.pad_token_id, streamer=streamer)

        def answer_in_thread(kw=kwargs):
            with decode_attention(device):  # the kernel choice is thread-local: set it where generate runs
                model.generate(**kw)

        Thread(target=answer_in_thread, daemon=True).start()
        print("model> ", end="", flush=True)
        answer = ""
        for piece in streamer:
            answer += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": answer.strip()})
