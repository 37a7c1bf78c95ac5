#!/usr/bin/env bash
# Session 21 call 2 (#24): GRPO's time per step and peak memory, loraforge against Unsloth + TRL's GRPOTrainer
# (fast_inference off), Llama-3.1-8B shape QLoRA, G = 8, completions up to 1,024 tokens, 2 steps.
# carry .gpu .lean .e2epack
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
timeout $(( $(left) - 5 )) python bench/grpo_speed.py --tokenizer $SMOL --cache /tmp/lf-grpo --out $OUT/w/grpo.json \
  --timeout $(( $(left) - 150 )) > $OUT/w/grpo.log 2>&1
python -c "import json;d=json.load(open('$OUT/w/grpo.json'));[print({k:v for k,v in r.items() if k!='error'}, str(r.get('error',''))[-600:]) for r in d['rows']];print(d.get('ratios'))" 2>&1 | tail -8
