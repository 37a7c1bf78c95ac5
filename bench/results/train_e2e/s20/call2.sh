#!/usr/bin/env bash
# Session 20 call 2 (#24), on call 1's machine: DPO and ORPO, Llama-3.1-8B shape QLoRA, 24 pairs of ~2 x 1,024
# tokens, loraforge (QLoRA defaults of now: 8-bit AdamW, input embedding in host memory) against Unsloth + TRL.
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
for obj in dpo orpo; do
  [ $(left) -gt 60 ] || { echo "skip $obj"; continue; }
  timeout $(( $(left) - 5 )) python bench/preference_speed.py --tokenizer $d/.e2e/tok --objectives $obj --tools loraforge,unsloth-trl \
    --pairs 24 --timeout 170 --cache /tmp/lf-e2e --out $OUT/w/pref_$obj.json > $OUT/w/pref_$obj.log 2>&1
  python -c "import json;d=json.load(open('$OUT/w/pref_$obj.json'));[print({k:r.get(k) for k in ('objective','tool','tokens_per_s','peak_reserved_gib','peak_allocated_gib','train_seconds','error')}) for r in d['rows']];print(d.get('ratios'))" 2>&1 | cut -c1-300
done
