#!/usr/bin/env bash
# Session 20 calls 2-4, on call 1's machine, as run (each was one `run` with DEADLINE 540 / 320 / 200):
# the SNIPS run's Unsloth + TRL row (its first start in call 1 timed out); DPO, then ORPO, on the Llama-3.1-8B
# shape QLoRA, 24 pairs of ~2 x 1,024 tokens, loraforge against Unsloth + TRL; loraforge's SNIPS row twice more.
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
e2e snips_unsloth 135m-snips unsloth-trl 0.1 --timeout 170                                   # call 2
for obj in dpo orpo; do                                                                        # calls 2, 3
  timeout $(( $(left) - 5 )) python bench/preference_speed.py --tokenizer $d/.e2e/tok --objectives $obj \
    --tools loraforge,unsloth-trl --pairs 24 --timeout 170 --cache /tmp/lf-e2e --out $OUT/w/pref_$obj.json \
    > $OUT/w/pref_$obj.log 2>&1
done
e2e snips_warm 135m-snips loraforge 0.1 --timeout 120                                          # call 4
e2e snips_warm2 135m-snips loraforge 0.1 --timeout 100
