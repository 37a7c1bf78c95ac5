"""Quickstart adapter: the 300 test queries with and without label-constrained decoding."""
import json, sys, time
from loraforge.quickstart import make_splits, SYSTEM_PROMPT, banking77_rows
from loraforge.eval.generate import build_messages, generate_batch, load_for_inference
from loraforge.eval.structured import Structure, compile_structure
from loraforge.eval.generate import stop_token_ids
import torch
torch.set_num_threads(2)
run = sys.argv[1]
h = load_for_inference(run)
_, _, test = make_splits(10, 300)
labels = sorted({r["category"] for r in banking77_rows("train")})
convs = [build_messages(r["text"], SYSTEM_PROMPT) for r in test]
gold = [r["category"] for r in test]
out = {}
for mode in ("plain", "labels"):
    g = compile_structure(h.tokenizer, Structure(labels=tuple(labels)), stop_token_ids(h.tokenizer, h.model)) if mode == "labels" else None
    t = time.time()
    gens = generate_batch(h.model, h.tokenizer, convs, max_new_tokens=24, batch_size=32, grammar=g)
    ans = [x.text for x in gens]
    acc = sum(a == b for a, b in zip(ans, gold)) / len(gold)
    out[mode] = {"accuracy": acc, "seconds": round(time.time() - t, 1), "answers": ans}
    print(mode, acc, out[mode]["seconds"], flush=True)
json.dump(out, open(sys.argv[2], "w"))
