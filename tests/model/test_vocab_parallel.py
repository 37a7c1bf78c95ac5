"""Embedding lookup and cross-entropy over a row-sharded (FSDP2-layout) vocabulary, in two gloo processes:
equal to the unsharded computation (values and the hidden states' gradient), with ranks holding different
numbers of tokens, an odd vocabulary size (uneven shards), ignored labels, and different loss weights per
rank (the trainer's weightless repeats). Each process runs this file as a worker under torchrun (on CPU with
gloo here; tests/gpu/test_multi_gpu.py runs the same worker on two GPUs with NCCL)."""

import json
import os
import subprocess
import sys
from pathlib import Path

V, H = 37, 8
TOKENS = {0: 7, 1: 4}


def worker(out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from loraforge.model.fast.vocab_parallel import is_row_sharded, vocab_parallel_ce_sum, vocab_parallel_embedding

    device = os.environ.get("VP_DEVICE", "cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank()
    if device == "cuda":
        torch.cuda.set_device(rank)
    torch.set_default_device(device)
    mesh = init_device_mesh(device, (2,))
    torch.manual_seed(0)
    full = torch.randn(V, H, dtype=torch.float64)
    weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]), requires_grad=False)
    torch.manual_seed(10 + rank)   # each rank its own tokens
    n = TOKENS[rank]
    ids = torch.randint(0, V, (n,))
    ids[0], ids[-1] = 0, V - 1      # both ends of the vocabulary, one on each rank's shard
    labels = ids.roll(1).clone()
    labels[1] = -100                # an ignored position
    hidden = torch.randn(n, H, dtype=torch.float64, requires_grad=True)
    scale = [1.0, 0.0][rank] if os.environ.get("ZERO_WEIGHT") else [0.5, 2.0][rank]

    emb = vocab_parallel_embedding(ids.view(1, -1), weight)
    loss = vocab_parallel_ce_sum(hidden, weight, labels, chunk=5)
    (loss * scale).backward()
    ref_h = hidden.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_h @ full.t(), labels, reduction="sum", ignore_index=-100)
    (ref * scale).backward()
    Path(f"{out}.{rank}").write_text(json.dumps({
        "sharded": is_row_sharded(weight), "local_rows": weight.to_local().shape[0],
        "emb_err": float((emb.view(n, H) - F.embedding(ids, full)).abs().max()),
        "loss": float(loss), "ref": float(ref),
        "grad_err": float((hidden.grad - ref_h.grad).abs().max()), "grad_norm": float(ref_h.grad.norm())}))
    dist.destroy_process_group()


def run_workers(tmp_path, **env):
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


def test_sharded_embedding_and_loss_equal_the_whole_vocabulary(tmp_path):
    reps = run_workers(tmp_path)
    assert [r["local_rows"] for r in reps] == [19, 18] and all(r["sharded"] for r in reps)
    for r in reps:
        assert r["emb_err"] == 0.0                      # one rank wrote each row: exact
        assert abs(r["loss"] - r["ref"]) < 1e-9 * max(1.0, abs(r["ref"])) and r["ref"] > 0
        assert r["grad_err"] < 1e-9 and r["grad_norm"] > 0.1


def test_a_weightless_rank_gets_no_gradient_and_the_other_its_own(tmp_path):
    reps = run_workers(tmp_path, ZERO_WEIGHT="1")
    assert reps[1]["grad_norm"] == 0.0 and reps[1]["grad_err"] == 0.0
    assert reps[0]["grad_norm"] > 0.1 and reps[0]["grad_err"] < 1e-9


if __name__ == "__main__":
    worker(sys.argv[1])
