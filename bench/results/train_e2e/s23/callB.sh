#!/usr/bin/env bash
# Session 23 call B (#19), on the machine call A left warm: keeps the first half of the embedded GGUF (carried as
# .gguf1/part; the device's 64 MiB carry limit takes it in two calls) for call C, then BANKING77's 3 epochs through
# loraforge with the benchmark's rate beside it, on a warm Triton cache. carry .gguf1
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
cp .gguf1/part /tmp/lf/smol.part1 && ls -la /tmp/lf/smol.part1
e2e banking77_3ep 135m-banking77 loraforge 3 --timeout 200 --bench-rate
