#!/usr/bin/env bash
# Session 20 call 1 (#19): the SNIPS run against Unsloth + TRL; the 135M BANKING77 run for 3 epochs with the new
# defaults (validation/checkpoint spacing auto, the four-a-call dropout mask), profiled a quarter in, with
# bench/train_speed.py's rate beside it; the same run with the old spacing (every 50 steps); the dropout kernel
# alone; then the GPU tests. carry .gpu .lean .e2epack
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
e2e snips 135m-snips loraforge,unsloth-trl 0.1 --timeout 120
e2e b77_3ep 135m-banking77 loraforge 3 --timeout 110 --bench-rate --profile $OUT/w/profile
e2e b77_3ep_every50 135m-banking77 loraforge-eval50-save50 3 --timeout 110
timeout 60 python bench/dropout_kernel.py --out $OUT/w/dropout_kernel.json > $OUT/w/dropout_kernel.log 2>&1; tail -4 $OUT/w/dropout_kernel.log | cut -c1-300
[ $(left) -gt 60 ] && timeout $(( $(left) - 10 )) python -m pytest -q tests/gpu/test_fast_gpu.py tests/gpu/test_cuda_train.py tests/gpu/test_host_embedding_gpu.py tests/gpu/test_preference_gpu.py -p no:cacheprovider > $OUT/w/gpu_tests.txt 2>&1; tail -5 $OUT/w/gpu_tests.txt
