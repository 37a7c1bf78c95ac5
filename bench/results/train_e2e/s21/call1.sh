#!/usr/bin/env bash
# Session 21 call 1 (#19): first the GPU test of train.interval.Readings (a row's loss read without a stream
# sync), then the 135M BANKING77 run for 3 epochs with bench/train_speed.py's rate beside it (profiled a quarter
# in), the SNIPS run for both tools in this one call (Unsloth + TRL first), and SNIPS for one epoch with the
# benchmark's rate beside it; SDPA's attention backends at the 8B shape (#25); then the rest of the GPU tests. carry .gpu .lean .e2epack
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
timeout 90 python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_train.py -k readings 2>&1 | tail -3
e2e b77_3ep 135m-banking77 loraforge 3 --timeout 110 --bench-rate --profile $OUT/w/profile
e2e snips 135m-snips unsloth-trl,loraforge 0.1 --timeout 200
e2e snips_1ep 135m-snips loraforge 1 --timeout 100 --bench-rate
timeout 60 python bench/attention_backends.py --out $OUT/w/attention_backends.json 2>&1 | grep '^{"length' | cut -c1-200
[ $(left) -gt 60 ] && timeout $(( $(left) - 10 )) python -m pytest -q tests/gpu/test_fast_gpu.py tests/gpu/test_cuda_train.py tests/gpu/test_host_embedding_gpu.py tests/gpu/test_preference_gpu.py -p no:cacheprovider > $OUT/w/gpu_tests.txt 2>&1; tail -5 $OUT/w/gpu_tests.txt
