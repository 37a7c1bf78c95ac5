"""Accuracy of a quickstart run's adapter (and the base) on its 300 test queries, plain vs label-constrained."""
import json, sys, time
from loraforge.quickstart import make_splits, SYSTEM_PROMPT, banking77_rows
from loraforge.eval.generate import build_messages, generate_batch, load_for_inference, stop_token_ids
from loraforge.eval.structured import Structure, compile_structure
from loraforge.eval.metrics import score

run = sys.argv[1]
_, _, test = make_splits(10, 300)
labels = sorted({r["category"] for r in banking77_rows("train")})
h = load_for_inference(run)
model, tok = h.model, h.tokenizer
convs = [build_messages(r["text"], SYSTEM_PROMPT) for r in test]
gold = [r["category"] for r in test]
out = {}
g = compile_structure(tok, Structure(labels=tuple(labels)), stop_token_ids(tok, model))
for name, grammar in (("plain", None), ("labels", g)):
    t = time.time()
    gens = generate_batch(model, tok, convs, max_new_tokens=24, batch_size=32, grammar=grammar)
    ans = [x.text for x in gens]
    out[name] = {"acc": score("exact_match", ans, gold).value, "s": round(time.time() - t, 1), "answers": ans}
    print(name, out[name]["acc"], out[name]["s"], flush=True)
json.dump(out, open(sys.argv[2], "w"))
