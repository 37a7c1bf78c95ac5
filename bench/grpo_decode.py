"""GRPO's sampling decode: transformers' `generate` (model.decode.decode_ids, with and without its shared prompt
prefix) against the fast path's decoder (model.fast.decode.fast_generate; on CUDA its one-token step replayed as a
CUDA graph), on the same left-padded prompts: BANKING77 queries formatted as the quickstart does, G copies each,
sampled at temperature 1 (as GRPO's default), with a LoRA adapter attached. Why GRPO on the CPU keeps `generate`,
and how fast a token the GPU's decoder is; a guide for the decoder, not the product's figure (that is
bench/grpo_speed.py: `loraforge train` against Unsloth + TRL).

    python bench/grpo_decode.py --out bench/results/preference/grpo_decode_cpu.json      # CPU, the embedded model
    python bench/grpo_decode.py --model TOKDIR --random-weights --prompts 8 --new-tokens 256   # a GPU machine

Prints one JSON object: per setting the seconds of each repeat (the first one warms up), and the new tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-weights", action="store_true", help="--model's config with random weights")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loraforge.config import LoraSection
    from loraforge.data.templates import prompt_text
    from loraforge.eval.generate import build_messages
    from loraforge.model.adapters import attach_adapter
    from loraforge.model.decode import _layout, decode_ids, stop_token_ids
    from loraforge.model.fast import FastLlama
    from loraforge.model.fast.decode import fast_generate
    from loraforge.model.load import resolve_base
    from loraforge.quickstart import SYSTEM_PROMPT, banking77_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    path = resolve_base(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    if a.random_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    model = attach_adapter(model.to(device), LoraSection(r=16, alpha=16, dropout=0.0)).eval()
    fast = FastLlama(model, dtype=dtype, checkpointing=False, graphs="off")
    texts = [r["text"] for r in banking77_rows("test")[:a.prompts]]
    prompts = [tok(prompt_text(tok, build_messages(t, SYSTEM_PROMPT)), add_special_tokens=False)["input_ids"]
               for t in texts for _ in range(a.group)]
    stops = stop_token_ids(tok, model)
    kw = dict(stops=stops, pad_id=tok.pad_token_id, max_new_tokens=a.new_tokens, batch_size=len(prompts),
              temperature=1.0, top_p=1.0, seed=1)
    ids, mask = _layout(prompts, tok.pad_token_id, 0)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    settings = {"generate_shared_prefix": lambda: decode_ids(model, prompts, share_prefix=True, **kw),
                "generate": lambda: decode_ids(model, prompts, share_prefix=False, **kw),
                "fast_decoder": lambda: fast_generate(fast, ids, mask, max_new_tokens=a.new_tokens, stops=stops,
                                                      temperature=1.0)}
    rows = {}
    for name, fn in settings.items():
        seconds = []
        for _ in range(a.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            seconds.append(round(time.perf_counter() - t0, 3))
        rows[name] = seconds
    emit({"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(0) if device == "cuda"
          else "cpu", "model": a.model, "random_weights": a.random_weights, "rows": len(prompts),
          "prompt_tokens_max": max(map(len, prompts)), "new_tokens": a.new_tokens, "seconds": rows}, a.out)


if __name__ == "__main__":
    main()
