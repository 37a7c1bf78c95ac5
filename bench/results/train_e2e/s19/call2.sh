#!/usr/bin/env bash
# Session 19 call 2 (#19, the 8B Llama shape QLoRA on the length mix, unpacked and packed). carry nothing (call 1's files stay on the machine)
# then #23's before/after bench/train_speed.py rows (ours-qlora at the 8B shape) from .v23, carried by call 1
. bench/results/train_e2e/s19/pre.sh
e2e 8b 8b-mix loraforge,unsloth-trl 0.25 --timeout 150
e2e 8b_packed 8b-mix-packed loraforge,unsloth-trl 0.25 --timeout 120
v=/tmp/v23; [ -d $v ] || { mkdir -p $v; tar xJf .v23/v23.tar.xz -C $v; }
ts() { local src=$1 n=$2; [ $(left) -gt 60 ] || { echo "skip $n"; return; }
  (cd $src && PYTHONPATH=$d/site:$src/src timeout $(( $(left) - 5 )) python bench/train_speed.py --tokenizer $d/.e2e/tok --shapes 8b --rows ours-qlora --steps 20 --warmup 3 --timeout 120 --workdir /tmp/lf-bench --out $OUT/w/$n > $OUT/w/$n.log 2>&1)
  python -c "import json;[print('$n',r.get('row'),r.get('tokens_per_s'),r.get('peak_reserved_gib'),r.get('error','')[:200]) for r in json.load(open('$OUT/w/$n/train_speed.json'))['rows']]" 2>&1 | tail -3; echo "t=$(( $(date +%s) - t0 ))"; }
ts $v/35ef30b ts_before; ts $v/3882eed ts_after; ts $PWD ts_head
