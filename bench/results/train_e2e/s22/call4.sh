#!/usr/bin/env bash
# Session 22 call 4 (#24), call 3 cut to the device time left: the fast decoder's GPU tests, then GRPO's step
# (8B QLoRA, G = 8, 1,024 completion tokens) through loraforge, Unsloth + TRL after it while time is left.
# carry .gpu .lean .e2epack
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
timeout 100 python -m pytest -q -p no:cacheprovider tests/gpu/test_fast_decode_gpu.py -x > $OUT/w/decode_tests.txt 2>&1; tail -4 $OUT/w/decode_tests.txt | cut -c1-900
timeout $(( $(left) - 5 )) python bench/grpo_speed.py --tokenizer $SMOL --cache /tmp/lf-grpo --out $OUT/w/grpo.json \
  --timeout $(( $(left) - 60 )) > $OUT/w/grpo.log 2>&1
python -c "import json;d=json.load(open('$OUT/w/grpo.json'));[print({k:v for k,v in r.items() if k!='error'}, str(r.get('error',''))[-900:]) for r in d['rows']];print(d.get('ratios'))" 2>&1 | tail -8
