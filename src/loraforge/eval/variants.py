"""`loraforge eval RUN --serve-as adapter,merged,gguf-q8_0`: the same adapter evaluated as it will be served.

    kinds = check_kinds(["merged", "gguf-q8_0"], device)      # request errors before any model loads
    gen, close = variant_generator("gguf-q8_0", run_dir, cfg, tok, device, out_dir)
    answers = gen(conversations, max_new_tokens)              # list[Generation], greedy
    table = compare_variants({"adapter": scored, "gguf-q8_0": scored2}, seed)

Variants: `adapter` (base + adapter in the training dtype: the fine-tuned model of the evaluation),
`merged` (the adapter folded into the base, bfloat16, as `loraforge export merge` writes it), `gguf-f16`,
`gguf-q8_0`, `gguf-q4_k_m` (the run exported by `loraforge export gguf` and run by llama.cpp through
llama-cpp-python) and `nf4` (4-bit NF4 base + adapter through bitsandbytes; CUDA only). Every variant
gets the same conversations rendered with the same chat template (the prompt is tokenised by the
Hugging Face tokenizer and passed to llama.cpp as token ids) and greedy decoding to the end-of-turn
token. Each row of the comparison: the metric with its bootstrap interval, the paired test against
the adapter row and the agreement rate (share of identical answers).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from loraforge.data.templates import prompt_text
from loraforge.errors import LoraforgeError
from loraforge.eval.generate import Generation, generate_batch
from loraforge.eval.results import ModelScore, VariantRow
from loraforge.eval.stats import paired_test
from loraforge.export.gguf import require_llama_cpp
from loraforge.export.merge import merged_model
from loraforge.export.pipeline import export_gguf
from loraforge.model.adapters import load_adapter
from loraforge.model.load import resolve_base
from loraforge.train.run_files import RunFiles

KINDS = ("adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "nf4")
GenFn = Callable[[list, int], list]


def check_kinds(kinds: list[str] | str | None, device: str) -> list[str]:
    """The requested variants in order, with `adapter` first (the row the others are compared against)."""
    if isinstance(kinds, str):
        kinds = kinds.split(",")
    wanted = [k.strip().lower() for k in kinds or [] if k.strip()]
    bad = [k for k in wanted if k not in KINDS]
    if bad:
        raise LoraforgeError(f"--serve-as {','.join(bad)}: unknown serving variant", hint=f"use {', '.join(KINDS)}")
    if not wanted:
        return []
    if "nf4" in wanted:
        if device != "cuda":
            raise LoraforgeError("serving variant nf4 (4-bit base + adapter) needs CUDA + bitsandbytes; "
                                 "this evaluation runs on the CPU", hint="run it on a GPU, or drop nf4 from --serve-as")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise LoraforgeError("serving variant nf4 needs CUDA + bitsandbytes, which is not installed",
                                 hint="pip install bitsandbytes") from None
    if any(k.startswith("gguf-") for k in wanted):
        require_llama_cpp()
    return ["adapter"] + [k for k in dict.fromkeys(wanted) if k != "adapter"]


def _hf_generator(model, tok, batch_size: int) -> GenFn:
    return lambda convs, n: generate_batch(model, tok, convs, max_new_tokens=n, batch_size=batch_size)


class GgufGenerator:
    """Greedy answers from a GGUF file through llama.cpp, prompts rendered by the Hugging Face chat template."""

    def __init__(self, path: Path, tokenizer, threads: int | None = None):
        self.path, self.tok, self.threads, self.llm, self.n_ctx = Path(path), tokenizer, threads, None, 0

    def _load(self, n_ctx: int):
        from llama_cpp import Llama  # an optional extra (llama-cpp-python), needed only for gguf-* variants

        if self.llm is None or n_ctx > self.n_ctx:
            self.close()
            self.n_ctx = max(n_ctx, 256)
            self.llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=min(self.n_ctx, 512),
                             verbose=False, seed=0, n_threads=self.threads)
        return self.llm

    def __call__(self, convs: list, max_new_tokens: int) -> list:
        """Greedy (top_k=1, no penalties) to an end-of-generation token; the new token ids are decoded by the
        same Hugging Face tokenizer as the other variants, so equal tokens give equal text."""
        import llama_cpp  # an optional extra, as in _load

        ids = [self.tok(prompt_text(self.tok, c), add_special_tokens=False)["input_ids"] for c in convs]
        llm = self._load(max(len(x) for x in ids) + max_new_tokens + 8)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        out = []
        for x in ids:
            new, stopped = [], False
            for t in llm.generate(x, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if llama_cpp.llama_vocab_is_eog(vocab, t):
                    stopped = True
                    break
                new.append(int(t))
                if len(new) >= max_new_tokens:
                    break
            out.append(Generation(self.tok.decode(new, skip_special_tokens=True).strip(), stopped, len(new)))
        return out

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def _nf4_model(cfg, adapter_dir: Path):

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(resolve_base(cfg.base_model), quantization_config=q,
                                                dtype=torch.bfloat16, device_map={"": 0})
    return load_adapter(base, adapter_dir)


def variant_generator(kind: str, files: RunFiles, cfg, tok, device: str, out_dir: Path,
                      batch_size: int) -> tuple[GenFn, Callable[[], None]]:
    """(generate(conversations, max_new_tokens), close()) for one serving variant other than `adapter`."""
    if kind == "merged":
        model = merged_model(files).model.to(device=device, dtype=torch.bfloat16)
        return _hf_generator(model, tok, batch_size), lambda: None
    if kind == "nf4":
        return _hf_generator(_nf4_model(cfg, files.adapter_dir), tok, batch_size), lambda: None
    if kind.startswith("gguf-"):
        quant = kind.removeprefix("gguf-")
        res = export_gguf(files, out_dir / "serve-as" / kind, quant=quant, overwrite=True)
        gen = GgufGenerator(res.model_file, tok, threads=torch.get_num_threads())
        return gen, gen.close
    raise LoraforgeError(f"unknown serving variant {kind}", hint=f"use {', '.join(KINDS)}")


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_variants(scored: dict[str, ModelScore], seed: int) -> dict[str, VariantRow]:
    """One row per variant: value, CI, stop rate, agreement with the adapter's answers, paired test vs adapter,
    and its answers."""
    ref = scored.get("adapter")
    rows = {}
    for kind, s in scored.items():
        row = VariantRow(s.value, s.ci, s.stop_rate, answers=s.answers)
        if ref is not None:
            same = [a == b for a, b in zip(s.answers, ref.answers, strict=True)]
            row.agreement = sum(same) / len(same)
            if kind != "adapter":
                row.vs_adapter = asdict(paired_test(s.per_example, ref.per_example, seed=seed))
        rows[kind] = row
    return rows
