"""The s13 quickstart adapter on its 300 test queries: plain greedy vs label-constrained decoding."""
import json, sys, time
from pathlib import Path
from loraforge.quickstart import make_splits, SYSTEM_PROMPT
from loraforge.model.load import load_base
from loraforge.config import EMBEDDED_MODEL
from loraforge.eval.generate import build_messages, generate_batch, stop_token_ids
from loraforge.eval.structured import Structure, compile_structure
from peft import PeftModel
run = Path(sys.argv[1])
train, val, test = make_splits(10, 300)
labels = sorted({r["category"] for r in train})
model, tok, _ = load_base(EMBEDDED_MODEL, device="cpu")
model = PeftModel.from_pretrained(model, str(run / "adapter"))
model.eval()
convs = [build_messages(r["text"], SYSTEM_PROMPT) for r in test]
grammar = compile_structure(tok, Structure(labels=tuple(labels)), stop_token_ids(tok, model))
out = {}
for name, g in (("plain", None), ("labels", grammar)):
    t0 = time.time()
    gens = generate_batch(model, tok, convs, max_new_tokens=24, batch_size=32, grammar=g)
    acc = sum(x.text.strip() == r["category"] for x, r in zip(gens, test)) / len(test)
    out[name] = {"accuracy": acc, "seconds": round(time.time() - t0, 1)}
    print(name, out[name], flush=True)
json.dump(out, open(f"/tmp/qs_constrained_{run.name}.json", "w"))
