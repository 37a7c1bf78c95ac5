# Interleaved CPU A/B of one config key on session 13's quickstart config (/tmp/qs13/config.yaml), N steps a trial,
# one JSON line per trial (median step after the first 3, train_seconds, losses). Used as:
#   bash ab.sh data.share_prefix "off auto auto off" 30                       > share_prefix_ab.jsonl
#   bash ab.sh model.fast_path "off on on off" 20 base_model=/tmp/qwen_shape train.select_by=loss
#                                                                             > fast_path_qwen_shape_ab.jsonl
# (the Qwen shape's folder from fast_path_qwen_shape_model.py)
key=$1; modes=$2; steps=$3; shift 3
for m in $modes; do
  rm -rf /tmp/ab_$m
  loraforge train /tmp/qs13/config.yaml output_dir=/tmp/ab_$m train.max_steps=$steps train.eval_every=1000 "$@" \
    $key=$m > /tmp/ab_$m.log 2>&1
  python - $m <<'PY'
import json, statistics, sys
m = sys.argv[1]
rows = [json.loads(x) for x in open(f"/tmp/ab_{m}/metrics.jsonl")]
el = [r["elapsed_s"] for r in rows]
steps = [b - a for a, b in zip(el, el[1:])]
s = json.load(open(f"/tmp/ab_{m}/summary.json"))
print(json.dumps({"mode": m, "median_step_s": round(statistics.median(steps[3:]), 3), "train_seconds": s["train_seconds"],
                  "fast_path_used": s["fast_path"], "loss1": rows[0]["loss"], "loss2": rows[1]["loss"],
                  "last_loss": rows[-1]["loss"], "val": s.get("final_val_loss")}))
PY
done
