"""On two CUDA GPUs (NCCL): the vocabulary-parallel embedding and loss equal the whole-vocabulary ones, and
`loraforge train --gpus 2` with FSDP2 on the fast path (bf16 and NF4 bases) follows the one-GPU curve.
Skipped with fewer than two GPUs (the CPU/gloo versions of these run in CI)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import chat_rows, make_tiny_model, metrics_rows, tiny_config, write_jsonl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def test_vocab_parallel_embedding_and_loss_over_nccl(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
    from test_vocab_parallel import run_workers

    reps = run_workers(tmp_path, VP_DEVICE="cuda")
    assert [r["local_rows"] for r in reps] == [19, 18]
    for r in reps:
        assert r["emb_err"] == 0.0 and abs(r["loss"] - r["ref"]) < 1e-9 * abs(r["ref"]) and r["grad_err"] < 1e-9


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_fsdp2_fast_path_on_two_gpus_follows_one_gpu(tmp_path, quantization):
    untied = make_tiny_model(tmp_path / "untied", tied=False)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())

    def tree(out, **kw):
        t = tiny_config(untied, data, out, grad_accum=4, lr_scheduler="constant", warmup_ratio=0.0, device="cuda",
                        precision="fp32", eval_every=2, save_every=100, max_steps=4, dist_timeout_s=120, **kw)
        t["lora"]["dropout"] = 0.0
        t["model"] = {"fast_path": "on", "gradient_checkpointing": "offload", "quantization": quantization}
        return t

    runs = {}
    for name, gpus, kw in (("one", 1, {}), ("two", 2, {"distributed": "fsdp"})):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(tree(tmp_path / name, **kw)))
        res = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg), "--gpus", str(gpus)],
                             env=ENV, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        runs[name] = res.stderr
    assert "embedding and head over their FSDP2 shards" in runs["two"]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[1]["processes"] == 2
    # the same bf16 base on one GPU and under FSDP2 (which loads it on the CPU before sharding)
    assert [s["compute_dtype"] for s in summaries] == ["bfloat16", "bfloat16"]
    one, two = metrics_rows(tmp_path / "one"), metrics_rows(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] and one[-1]["loss"] < one[0]["loss"]
    # bf16 weights, different reduction orders (sharded head vs liger's fused loss): the 1 %
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-2)
    assert [r.get("val_loss", -1) for r in two] == pytest.approx([r.get("val_loss", -1) for r in one], rel=1e-2)
