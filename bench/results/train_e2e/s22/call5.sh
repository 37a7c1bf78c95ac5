#!/usr/bin/env bash
# Session 22 call 5 (#24), for the ~150 s of device time left: the fast decoder's GPU tests, then GRPO through
# loraforge alone at the 1B shape (QLoRA, G = 8, 1,024 completion tokens): does the product path decode through
# the CUDA graph, and how fast a token. carry .gpu .lean .e2epack
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
timeout 80 python -m pytest -q -p no:cacheprovider tests/gpu/test_fast_decode_gpu.py -x > $OUT/w/decode_tests.txt 2>&1; tail -4 $OUT/w/decode_tests.txt | cut -c1-900
timeout $(( $(left) - 5 )) python bench/grpo_speed.py --tokenizer $SMOL --shape 1b --tools loraforge --cache /tmp/lf-grpo \
  --out $OUT/w/grpo_1b.json --timeout $(( $(left) - 15 )) > $OUT/w/grpo_1b.log 2>&1
python -c "import json;d=json.load(open('$OUT/w/grpo_1b.json'));[print({k:v for k,v in r.items() if k!='error'}, str(r.get('error',''))[-900:]) for r in d['rows']]" 2>&1 | tail -4
