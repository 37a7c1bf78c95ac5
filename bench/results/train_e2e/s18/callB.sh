#!/bin/bash
# interleaved A/B: A = before MaskDropout (0aa3e0a), B = main
for round in 1 2; do
 for v in A B; do
  src=/work/main/src; [ $v = A ] && src=/work/wt/qs-a/src
  cd /tmp && LORAFORGE_CACHE=/root/.cache/loraforge PYTHONPATH=$src timeout 400 /work/venv/bin/python -m loraforge quickstart --output-dir /tmp/ab_$v$round --overwrite --test-size 8 train.max_steps=30 train.eval_every=1000 > /tmp/ab_$v$round.log 2>&1
  /work/venv/bin/python -c "
import json, statistics
rows=[json.loads(l) for l in open('/tmp/ab_$v$round/metrics.jsonl') if 'elapsed_s' in l]
d=[b['elapsed_s']-a['elapsed_s'] for a,b in zip(rows,rows[1:])]
print('$v$round', 'median', round(statistics.median(d),3), 'mean 5..30', round((rows[-1]['elapsed_s']-rows[4]['elapsed_s'])/(len(rows)-5),3))
"
 done
done
