"""plan_speed for bench/train_e2e.py rows measured before summary.json carried it (sessions 10-11): recomputed
from the same data files, configs and tokenizer as those runs, with the trainer's own batching (train.shapes).

    python bench/plan_runs_offline.py --data .e2e --smol-config SMOL/config.json FILE... > rows.json
    python bench/plan_runs.py --write rows.json

Those runs validated one batch of `batch_size` examples per forward (packed runs too: validation batches by a
training step's tokens came after them), so their validation forwards are counted that way here. CUDA graphs
(hence length buckets) applied where model.fast.graphs.host_bound says so, as on the GPU; the card is the H100
they ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]

from collections import Counter  # noqa: E402

from transformers import AutoTokenizer, LlamaConfig  # noqa: E402

from loraforge.config import build_config  # noqa: E402
from loraforge.data.batching import length_buckets  # noqa: E402
from loraforge.data.packing import pack  # noqa: E402
from loraforge.model.fast.graphs import host_bound  # noqa: E402
from loraforge.plan.for_run import speed_inputs  # noqa: E402
from loraforge.train.loop import validation_groups  # noqa: E402
from loraforge.train.run import load_data  # noqa: E402
from loraforge.train.shapes import run_shapes  # noqa: E402
from train_e2e import DROPOUT, LR, RUNS, SEED, R  # noqa: E402
from train_speed import SHAPES  # noqa: E402

H100 = ("NVIDIA H100 80GB HBM3", 81559 * 2**20)


def layer_weights(c: dict) -> int:
    h, i = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return h * (q + 2 * kv) + q * h + h * 2 * i + i * h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--smol-config", type=Path, required=True)
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.data / "tok")
    smol = json.loads(a.smol_config.read_text())
    cache, rows = {}, []
    for f in a.files:
        result = json.loads(Path(f).read_text())
        cmd = result["command"]
        epochs = float(cmd.split("--epochs")[1].split()[0]) if "--epochs" in cmd else 1.0
        for r in result["rows"]:
            if r.get("tool") != "loraforge" or "train_seconds" not in r:
                continue
            spec = RUNS[r["run"]]
            conf = dict(smol if spec["model"] == "smollm2" else LlamaConfig(**SHAPES[spec["model"]]).to_dict())
            conf["_name_or_path"] = spec["model"]
            cfg = build_config({
                "base_model": "x", "output_dir": "/tmp/x", "seed": SEED,
                "model": {"quantization": "nf4" if spec.get("qlora") else "none",
                          "gradient_checkpointing": "offload" if spec.get("qlora") else False},
                "data": {"train": str(a.data / f"{spec['data']}-train.jsonl"),
                         "validation": str(a.data / f"{spec['data']}-val.jsonl"),
                         "max_seq_length": spec["seq"], "packing": bool(spec.get("packing"))},
                "lora": {"r": R, "alpha": R, "dropout": DROPOUT},
                "train": {"epochs": epochs, "learning_rate": LR, "batch_size": spec["batch"],
                          "grad_accum": spec["accum"]}})
            key = (spec["data"], spec["seq"])
            if key not in cache:
                cache[key] = load_data(cfg, tok, None)[:2]
            train, val = cache[key]
            items = pack(train, spec["seq"]) if spec.get("packing") else train
            buckets = None
            if not spec.get("packing"):
                b = length_buckets([len(t.input_ids) for t in items], spec["batch"], SEED)
                buckets = b if host_bound(spec["batch"] * b[-1], layer_weights(conf)) else None
            shapes = run_shapes(items, val, cfg, buckets)
            old = Counter((len(g), max(len(t.input_ids) for t in g)) for g in validation_groups(val, spec["batch"])[0])
            shapes = replace(shapes, val_batches=tuple((x, n, c) for (x, n), c in sorted(old.items())))
            rows.append({**r, "epochs": epochs, "file": Path(f).name,
                         "plan_speed": speed_inputs(cfg, conf, shapes, *H100)})
    print(json.dumps({"command": "python bench/plan_runs_offline.py " + " ".join(sys.argv[1:]), "rows": rows},
                     indent=1))


if __name__ == "__main__":
    main()
