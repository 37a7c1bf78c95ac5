"""Evaluation generation speed: loraforge's batched greedy generation vs `model.generate` one prompt at a time.

    python bench/eval_generate.py                                  # GPU: smollm2-135m-instruct, 300 queries, batch 64
    python bench/eval_generate.py --device cpu --n 16 --batch-size 8 --max-new-tokens 16   # CPU smoke test
    python bench/eval_generate.py --model path/to/hf-folder --out bench/results/eval_generate.json
    python bench/eval_generate.py --model TOKDIR --random-weights   # a GPU machine without the embedded model:
                                                                    # TOKDIR = SmolLM2's config.json + tokenizer

Takes N BANKING77 test queries (seeded sample) formatted as the quickstart does (its system prompt,
the model's chat template), answers them (a) with loraforge.eval.generate.generate_batch (length-sorted,
left-padded batches, KV cache, stop at the end-of-turn token) and (b) with `model.generate` on one
unpadded prompt at a time, both greedy with the same max_new_tokens and stop tokens; checks how many
answers agree and prints one JSON object {device, n, batch_size, seconds_batched, seconds_one_by_one,
speedup, agreement, ...} (also written to --out).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402


def queries(n: int, seed: int) -> list[str]:
    from loraforge.quickstart import banking77_rows

    rows = banking77_rows("test")
    return [r["text"] for r in random.Random(seed).sample(rows, min(n, len(rows)))]


def one_by_one(model, tok, convs: list[list[dict]], max_new_tokens: int) -> list[str]:
    import torch

    from loraforge.data.templates import prompt_text
    from loraforge.eval.generate import stop_token_ids

    stops = stop_token_ids(tok, model)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for c in convs:
            enc = tok(prompt_text(tok, c), return_tensors="pt", add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            toks = gen[0, enc["input_ids"].shape[1]:].tolist()
            cut = next((k for k, t in enumerate(toks) if t in stops), None)
            out.append(tok.decode(toks if cut is None else toks[:cut], skip_special_tokens=True).strip())
    return out


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, HF folder or Hub id")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--n", type=int, default=300, help="test queries")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=24, help="as in the quickstart")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare-backends", action="store_true",
                    help="CUDA: also time the batched run with SDPA's cuDNN backend allowed, and the one-by-one "
                         "run on the first --n-backend queries without it (the product leaves cuDNN out while "
                         "generating, see loraforge.model.attention)")
    ap.add_argument("--n-backend", type=int, default=32)
    ap.add_argument("--random-weights", action="store_true",
                    help="--model is a folder with config.json + tokenizer only: build the model with random "
                         "weights (speed does not depend on them; every answer runs to max_new_tokens)")
    args = ap.parse_args(argv)

    import torch

    from loraforge.eval.generate import build_messages, generate_batch
    from loraforge.model.load import load_base, pick_device
    from loraforge.quickstart import SYSTEM_PROMPT

    device = pick_device(args.device)
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM

        from loraforge.model.load import load_tokenizer

        torch.manual_seed(args.seed)
        dtype = torch.bfloat16 if device == "cuda" and args.dtype == "auto" else \
            getattr(torch, "float32" if args.dtype == "auto" else args.dtype)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=dtype).to(device)
        model.eval().requires_grad_(False)
        tok = load_tokenizer(args.model)
    else:
        model, tok, _ = load_base(args.model, dtype=args.dtype, device=device)
    convs = [build_messages(q, SYSTEM_PROMPT) for q in queries(args.n, args.seed)]
    generate_batch(model, tok, convs[:2], max_new_tokens=2, batch_size=2)        # warm-up (kernels, allocator)
    sync(device)
    t = time.perf_counter()
    batched = generate_batch(model, tok, convs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    sync(device)
    seconds_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = one_by_one(model, tok, convs, args.max_new_tokens)
    sync(device)
    seconds_single = time.perf_counter() - t
    extra = {}
    if args.compare_backends and device == "cuda":
        from loraforge.model.attention import decode_attention

        t = time.perf_counter()
        generate_batch(model, tok, convs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       cudnn_attention=True)
        sync(device)
        extra["seconds_batched_cudnn_allowed"] = round(time.perf_counter() - t, 3)
        sub = convs[:args.n_backend]
        t = time.perf_counter()
        with decode_attention(torch.device("cuda")):
            one_by_one(model, tok, sub, args.max_new_tokens)
        sync(device)
        per_query = (time.perf_counter() - t) / len(sub)
        extra["one_by_one_without_cudnn_s_per_query"] = round(per_query, 4)
        extra["one_by_one_default_s_per_query"] = round(seconds_single / len(convs), 4)
        extra["speedup_vs_one_by_one_without_cudnn"] = round(per_query * len(convs) / seconds_batched, 2)
    same = [b.text == s for b, s in zip(batched, single)]
    result = {"device": device if device != "cuda" else f"cuda ({torch.cuda.get_device_name(0)})",
              "model": args.model, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "n": len(convs), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "seconds_batched": round(seconds_batched, 3), "seconds_one_by_one": round(seconds_single, 3),
              "speedup": round(seconds_single / seconds_batched, 2), "agreement": round(sum(same) / len(same), 4),
              **extra,
              "disagreements": [{"query": c[-1]["content"], "batched": b.text, "one_by_one": s}
                                for c, b, s, ok in zip(convs, batched, single, same) if not ok][:5],
              "command": "python bench/eval_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
