#!/usr/bin/env bash
# Session 23 call B (#19), on the machine call A left warm: keeps the first half of the embedded GGUF (carried as
# .gguf1/part; the device's 64 MiB carry limit takes it in two calls) for call C, then BANKING77's 3 epochs through
# loraforge with the benchmark's rate beside it, on a warm Triton cache, then where SNIPS's first 40 steps go
# (bench/warmup_cost.py: torch's attention pick, flash, cuDNN, each in a fresh process). carry .gguf1
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
cp .gguf1/part /tmp/lf/smol.part1 && ls -la /tmp/lf/smol.part1
e2e banking77_3ep 135m-banking77 loraforge 3 --timeout 200 --bench-rate
timeout $(( $(left) - 10 )) python bench/warmup_cost.py --train $d/.e2e/snips-train.jsonl --val $d/.e2e/snips-val.jsonl \
  --smol $SMOL --sdpa default,flash,cudnn --steps 40 --out $OUT/w/warmup_cost.json > $OUT/w/warmup_cost.log 2>&1; tail -4 $OUT/w/warmup_cost.log | cut -c1-600
