#!/usr/bin/env bash
# Session 19 call 1 (#19: the 1B Llama shape on the length mix, unpacked and packed; SmolLM2-135M's shape on
# BANKING77), each against the peers. carry .gpu .lean .e2epack .v23
. bench/results/train_e2e/s19/pre.sh
e2e 1b 1b-mix loraforge,unsloth-trl 0.25 --timeout 120
e2e 1b_packed 1b-mix-packed loraforge,unsloth-trl,trl 0.25 --timeout 100
e2e b77 135m-banking77 loraforge,unsloth-trl,trl 0.15 --timeout 120
