#!/usr/bin/env bash
# Session 19 call 3 (#23: bench/train_speed.py's ours-qlora at the 8B shape before the refactors (35ef30b), after
# them (3882eed) and now, in one call). carry .gpu .lean .e2epack .v23
# .v23/v23.tar.xz: `git archive` of src/ and bench/*.py at 35ef30b and 3882eed.
. bench/results/train_e2e/s19/pre.sh
v=/tmp/v23; [ -d $v ] || { mkdir -p $v; tar xJf .v23/v23.tar.xz -C $v; }
ts() { local src=$1 n=$2; [ $(left) -gt 45 ] || { echo "skip $n"; return; }
  (cd $src && PYTHONPATH=$d/site:$src/src timeout $(( $(left) - 3 )) python bench/train_speed.py --tokenizer $d/.e2e/tok --shapes 8b --rows ours-qlora --steps 20 --warmup 3 --timeout 120 --workdir /tmp/lf-bench --out $OUT/w/$n > $OUT/w/$n.log 2>&1)
  python -c "import json;[print('$n',r.get('row'),r.get('tokens_per_s'),r.get('peak_reserved_gib'),r.get('error','')[:200]) for r in json.load(open('$OUT/w/$n/train_speed.json'))['rows']]" 2>&1 | tail -3; echo "t=$(( $(date +%s) - t0 ))"; }
ts $v/35ef30b ts_before; ts $v/3882eed ts_after; ts $PWD ts_head
