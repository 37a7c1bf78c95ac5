#!/usr/bin/env bash
# Session 23 call A (#24, #19): the fast decoder's GPU tests (graph replays against eager, packed NF4 products
# against the rebuilt weight), the NF4 decode products timed at 8B shapes (bench/nf4_decode_matmul.py), GRPO's step
# against Unsloth + TRL (8B QLoRA, G = 8, 1,024 completion tokens), then validation's forwards
# (bench/validation_speed.py) and the SNIPS run for one epoch with the benchmark's rate beside it.
# carry .gpu .lean .e2epack .pre  (.pre: src/ of 7c1e0a3, the tree before model.fast.nf4_matmul, used if its tests fail)
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
timeout 170 python -m pytest -q -p no:cacheprovider tests/gpu/test_fast_decode_gpu.py tests/gpu/test_preference_gpu.py -k "decode or grpo or packed" > $OUT/w/decode_tests.txt 2>&1
rc=$?; tail -4 $OUT/w/decode_tests.txt | cut -c1-900; echo "t=$(( $(date +%s) - t0 ))"
if [ $rc -ne 0 ]; then mkdir -p /tmp/pre && tar xJf .pre/src.tar.xz -C /tmp/pre && export PYTHONPATH=$d/site:/tmp/pre/src && echo "FALLBACK to 7c1e0a3 src"; fi
timeout 60 python bench/nf4_decode_matmul.py --out $OUT/w/nf4_decode_matmul.json > $OUT/w/nf4_decode_matmul.log 2>&1; grep -v "^ \|^{\|^}" $OUT/w/nf4_decode_matmul.log | cut -c1-400 | tail -6
timeout $(( $(left) - 190 )) python bench/grpo_speed.py --tokenizer $SMOL --cache /tmp/lf-grpo --out $OUT/w/grpo.json \
  --timeout 200 > $OUT/w/grpo.log 2>&1
python -c "import json;d=json.load(open('$OUT/w/grpo.json'));[print({k:v for k,v in r.items() if k!='error'}, str(r.get('error',''))[-600:]) for r in d['rows']];print(d.get('ratios'))" 2>&1 | tail -8 | cut -c1-1500
echo "t=$(( $(date +%s) - t0 ))"
[ $(left) -gt 150 ] && timeout 90 python bench/validation_speed.py --train $d/.e2e/snips-train.jsonl --val $d/.e2e/snips-val.jsonl \
  --smol $SMOL --cache /tmp/lf-valspeed --out $OUT/w/validation_speed.json > $OUT/w/validation_speed.log 2>&1
python -c "import json;d=json.load(open('$OUT/w/validation_speed.json'));print({k:v for k,v in d.items() if not isinstance(v,(list,dict))})" 2>&1 | tail -2 | cut -c1-800
e2e snips_1ep 135m-snips loraforge 1 --timeout 100 --bench-rate
