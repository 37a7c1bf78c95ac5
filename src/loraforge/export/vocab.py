"""Tokenizer metadata for GGUF files, read from a Hugging Face fast tokenizer.

    vocab = gguf_vocab(tokenizer, n_vocab=model.config.vocab_size)
    vocab.write(gguf_writer)

Byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2/3, Mistral Tekken) become
`tokenizer.ggml.model = gpt2` with tokens, token types, merges, the pre-tokenizer name llama.cpp
knows (recognised from the tokenizer's own pre-tokenizer definition, not guessed), the special token
ids, add-bos/eos flags and the chat template. `end_of_turn` finds the token that closes an
assistant turn by rendering the chat template, so generation config, GGUF and Modelfile agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from loraforge.data.templates import END_OF_TURN
from loraforge.errors import LoraforgeError

# GGUF token types (gguf.TokenType), spelled out so this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of tokenizer.json files, with the name llama.cpp gives their pre-tokenizer.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", TEKKEN_REGEX: "tekken"}


@dataclass
class GgufVocab:
    model: str                          # tokenizer.ggml.model
    pre: str                            # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)   # bos/eos/eot/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, w) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LoraforgeError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json",
                             hint="save the tokenizer with transformers' fast tokenizer")
    return json.loads(backend.to_str())


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for this tokenizer.json pre-tokenizer; a LoraforgeError when it has none."""
    kind = (pre or {}).get("type")
    parts = pre.get("pretokenizers", []) if kind == "Sequence" else [pre] if pre else []
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"        # StarCoder/SmolLM: every digit alone, then the GPT-2 split
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_PRE:
            return SPLIT_PRE[regex]
    raise LoraforgeError(f"this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp equivalent "
                         "that loraforge knows", hint="GGUF export supports the GPT-2, SmolLM, Llama 3, Qwen2 "
                         "and Tekken pre-tokenizers")


def merges_of(model: dict) -> list[str]:
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):  # newer tokenizer.json: pairs; a space inside becomes U+0120
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    return list(merges)


def end_of_turn(tokenizer) -> str | None:
    """The token that closes an assistant turn in the chat template (e.g. <|im_end|>), or None."""
    marker = "Zq7xQ"
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # noqa: BLE001 - templates may reject this conversation (e.g. want a system turn)
            text = ""
        if marker in text:
            rest = text.split(marker, 1)[1].lstrip(" ")
            hit = next((s for s in specials if rest.startswith(s)), None)
            if hit:
                return hit
    vocab = tokenizer.get_vocab()
    return next((t for t in END_OF_TURN if t in vocab), tokenizer.eos_token)


def _adds_specials(tokenizer) -> tuple[bool, bool]:
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return add_bos, add_eos


def gguf_vocab(tokenizer, n_vocab: int | None = None) -> GgufVocab:
    """GGUF tokenizer metadata for a byte-level BPE tokenizer; rows up to the model's n_vocab are padded."""
    tj = tokenizer_json(tokenizer)
    model = tj.get("model") or {}
    decoder = (tj.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise LoraforgeError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 style); this one is "
                             f"{model.get('type')} with a {decoder} decoder",
                             hint="SentencePiece-style tokenizers (Llama 2, Mistral 7B v0.1-v0.3) are not supported yet")
    pre = pre_tokenizer_name(tj.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    top = max(vocab.values()) + 1
    if n_vocab is not None and top > n_vocab:
        raise LoraforgeError(f"the tokenizer has ids up to {top - 1} but the model's embedding has only {n_vocab} "
                             "rows", hint="resize the model's token embeddings to the tokenizer before exporting")
    n_vocab = max(n_vocab or 0, top)
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            text = added[i].content
            types.append(CONTROL if added[i].special or (text.startswith("<|") and text.endswith("|>"))
                         else USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(NORMAL)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    eot = end_of_turn(tokenizer)
    if eot is not None and vocab.get(eot) not in (None, ids["eos"]):
        ids["eot"] = vocab[eot]
    if ids["eos"] is None and eot is not None:
        ids["eos"] = vocab.get(eot)
    add_bos, add_eos = _adds_specials(tokenizer)
    return GgufVocab("gpt2", pre, tokens, types, merges_of(model),
                     {k: int(v) for k, v in ids.items() if v is not None}, add_bos, add_eos,
                     tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None)
