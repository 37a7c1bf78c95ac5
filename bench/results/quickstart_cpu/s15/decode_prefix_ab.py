import json, time, torch
from loraforge.model.load import load_base
from loraforge.model.adapters import load_adapter
from loraforge.model.decode import decode_ids, stop_token_ids
from loraforge.eval.generate import build_messages, generate_batch
from loraforge.data.templates import prompt_text
from loraforge.quickstart import EMBEDDED_MODEL, SYSTEM_PROMPT
model, tok, _ = load_base(EMBEDDED_MODEL, device="cpu")
model = load_adapter(model, "/tmp/qs13/adapter")
rows = [json.loads(l) for l in open('/tmp/qs13/data/validation.jsonl')]
convs = [build_messages(r["messages"][0]["content"], SYSTEM_PROMPT) for r in rows]
prompts = [tok(prompt_text(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
res = {}
for share in (False, True, False, True):
    t = time.time()
    c = decode_ids(model, prompts, stops=stop_token_ids(tok, model), pad_id=tok.pad_token_id, max_new_tokens=24, share_prefix=share)
    res[share] = c
    print(share, round(time.time() - t, 2), sum(tok.decode(x.ids, skip_special_tokens=True).strip() == r["messages"][1]["content"] for x, r in zip(c, rows)))
print("identical", sum(a.ids == b.ids for a, b in zip(res[False], res[True])), len(rows))
