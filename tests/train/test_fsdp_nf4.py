"""FSDP2 over a 4-bit NF4 (QLoRA) base, on CPU with gloo: two processes follow the one-process loss curve of
the same NF4 model, each rank keeps only its shard of the packed NF4 bytes (and the bytes FSDP2 gathers
for a forward are the original ones, with the quantisation state back in place), the packed weights get
no gradient, and the adapter rank 0 saves loads back. Needs a bitsandbytes that runs NF4 on CPU (0.50);
skipped without it (CI installs it: the `qlora` extra). The model is built in memory (quantize_linears_ on CPU), so each process runs this
file as a worker (under torchrun for two), calling the trainer with the NF4 model as its base."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

bnb = pytest.importorskip("bitsandbytes")
if __name__ != "__main__":  # the pytest side (a worker process needs neither)
    from conftest import assert_same_curve, metrics_rows

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def nf4_base(model_dir: str, storage: str = "uint8"):
    """The tiny Llama (in_features 64 and 128: whole NF4 blocks) with every decoder linear in NF4, its packed
    bytes stored as `storage` (bitsandbytes' quant_storage: the same bytes, another dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.model.load import load_tokenizer
    from loraforge.model.quant import quantize_linears_

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    assert quantize_linears_(model, "cpu", storage=storage) == 14  # 7 linears x 2 layers; the tied head stays 16-bit
    model.is_loaded_in_4bit = True  # as transformers' bnb loader marks it: PEFT wraps with its bnb LoRA layer
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # fp32 compute over the dequantised NF4 weights, so the 2-process curve can match to fp32 rounding
            # (in bf16, the different order of the gradient sums flips bf16 roundings, ~1e-4 after 8 steps);
            # bitsandbytes' CPU inference kernel is another numeric path: off in both runs
            m.compute_dtype = torch.float32
            m.support_avx512bf16_for_cpu = False
    return model, load_tokenizer(model_dir)


def worker(cfg_file: str, report: str, storage: str, resume: bool) -> None:
    """One process of a run (torchrun sets RANK / WORLD_SIZE): train, then report what this rank holds."""
    import torch

    from loraforge.config import build_config
    from loraforge.model.shard_nf4 import ATTR, packed_nf4_parameters
    from loraforge.train.run import run_training

    cfg = build_config(yaml.safe_load(Path(cfg_file).read_text()))
    model, tok = nf4_base(cfg.base_model, storage)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    packed = {n: m.weight.data.reshape(-1).view(torch.uint8).clone() for n, m in linears.items()}
    seen: dict[str, list] = {}

    def check(name):  # after the module's forward, while FSDP2's gathered weight is in place
        def hook(module, args, out):
            w = module.weight
            seen.setdefault(name, []).append(
                [bool(torch.equal(w.detach().reshape(-1).view(torch.uint8), packed[name])),
                 getattr(w, "quant_state", None) is not None, w.requires_grad])
        return hook

    for n, m in linears.items():
        m.register_forward_hook(check(n))
    res = run_training(cfg, overwrite=not resume, resume=resume, with_changes=resume,  # max_steps 4 -> none
                       base=(model, tok, cfg.base_model))
    rank = int(os.environ.get("RANK", "0"))
    shards = {}
    prepared = {id(p) for p in packed_nf4_parameters(model).values()}
    for key, m in linears.items():
        if not hasattr(m, ATTR):
            continue
        p = m.weight
        assert id(p) in prepared
        local = p.to_local() if hasattr(p, "to_local") else p.data
        full = packed[key]
        chunk = -(-full.numel() // int(os.environ.get("WORLD_SIZE", "1")))
        mine = full[rank * chunk:(rank + 1) * chunk]
        shards[key] = {"local": local.numel() * local.element_size(), "full": full.numel(), "dtype": str(local.dtype),
                       "bytes_match": bool(torch.equal(local.reshape(-1).view(torch.uint8), mine)),
                       "grad": p.grad is not None, "requires_grad": p.requires_grad}
    Path(f"{report}.{rank}").write_text(json.dumps({"shards": shards, "seen": seen, "summary": res.summary}))


def _write_cfg(root: Path, tiny_model, data, name: str, fast: str = "off", **train) -> Path:
    from conftest import tiny_config

    # grad_accum=3 over 2 processes: one rank runs a weightless repeat every step; a constant lr, so that a
    # run cut by max_steps resumes onto the same curve
    tree = tiny_config(tiny_model, data, root / name, grad_accum=3, lr_scheduler="constant", warmup_ratio=0.0,
                       num_threads=1, device="cpu", dist_timeout_s=60, eval_every=2, save_every=3, epochs=2,
                       distributed="fsdp", **train)
    tree["model"] = {"quantization": "nf4", "fast_path": fast, "gradient_checkpointing": True}
    path = root / f"{name}-{len(train)}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _launch(cfg: Path, report: Path, n: int, storage: str = "uint8", *extra: str) -> list[dict]:
    cmd = [sys.executable, __file__, str(cfg), str(report), storage, *extra]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *cmd[1:]]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return [json.loads(Path(f"{report}.{r}").read_text()) for r in range(n)]


SIZES = {"q_proj": 64 * 64, "k_proj": 32 * 64, "v_proj": 32 * 64, "o_proj": 64 * 64, "gate_proj": 128 * 64,
         "up_proj": 128 * 64, "down_proj": 64 * 128}  # weights per linear of the tiny Llama; NF4: 2 per byte


def _check_rank(rep: dict, rank: int) -> None:
    shards = rep["shards"]
    assert len(shards) == 14
    for name, s in shards.items():
        # this rank holds its half of the packed NF4 bytes and nothing more, the original bytes, frozen
        assert s["full"] == SIZES[name.rsplit(".", 1)[-1]] // 2, name
        assert s["local"] == s["full"] // 2 and s["dtype"] == "torch.float32", (rank, name, s)
        assert s["bytes_match"] and not s["grad"] and not s["requires_grad"], (rank, name, s)
    # every forward (training, validation, the recomputation of checkpointed layers in backward) ran on the
    # gathered original bytes, with their quantisation state in place, as a frozen tensor
    assert set(rep["seen"]) == set(shards)
    calls = [c for cs in rep["seen"].values() for c in cs]
    assert calls and all(c == [True, True, False] for c in calls)


def test_prepared_nf4_linears_compute_as_before_whatever_tensor_holds_their_bytes(tiny_model):
    """In one process: prepare_nf4_for_fsdp keeps the outputs bit for bit, and the pre-forward hook puts the
    quantisation state back when the parameter is replaced by another tensor of the same bytes (FSDP2's
    all-gathered weight); a parameter cast to float numbers is refused with a message."""
    import torch

    from loraforge.errors import LoraforgeError
    from loraforge.model.shard_nf4 import ATTR, packed_nf4_parameters, prepare_nf4_for_fsdp

    base, tok = nf4_base(str(tiny_model))
    ids = tok("What colour is the sky?", return_tensors="pt").input_ids
    linears = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    packed = [m.weight.data.reshape(-1).view(torch.uint8).clone() for m in linears]
    with torch.no_grad():
        ref = base(ids).logits
        assert prepare_nf4_for_fsdp(base, "cpu") == 14 and prepare_nf4_for_fsdp(base, "cpu") == 14  # idempotent
        assert len(packed_nf4_parameters(base)) == 14
        for m, b in zip(linears, packed):
            assert type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float32
            assert torch.equal(m.weight.reshape(-1).view(torch.uint8), b) and not m.weight.requires_grad
            assert getattr(m.weight, "quant_state", None) is None and hasattr(m, ATTR)
        assert torch.equal(base(ids).logits, ref)
        for m in linears:  # as FSDP2 does: another tensor of the same bytes in the parameter's place
            m.weight = torch.nn.Parameter(m.weight.detach().clone(), requires_grad=False)
        assert torch.equal(base(ids).logits, ref)
        assert all(m.weight.quant_state is getattr(m, ATTR) for m in linears)
        linears[3].weight = torch.nn.Parameter(linears[3].weight.detach().to(torch.bfloat16), requires_grad=False)
        with pytest.raises(LoraforgeError, match="turned the packed NF4 bytes into torch.bfloat16"):
            base(ids)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """1 process (8 steps) is the reference; FSDP2 x2 runs steps 1-4 (checkpoint at 3), then FSDP2 x2 over
    the same model stored as bf16 (bitsandbytes' quant_storage for FSDP) resumes to step 8."""
    from conftest import chat_rows, write_jsonl

    root = tmp_path_factory.mktemp("fsdp-nf4")
    data = write_jsonl(root / "train.jsonl", chat_rows())
    [one] = _launch(_write_cfg(root, tiny_model, data, "one"), root / "rep-one", 1)
    first = _launch(_write_cfg(root, tiny_model, data, "two", max_steps=4), root / "rep-a", 2)
    first_rows = metrics_rows(root / "two")
    second = _launch(_write_cfg(root, tiny_model, data, "two"), root / "rep-b", 2, "bfloat16", "--resume")
    return root, one, first, first_rows, second


def test_fsdp2_over_nf4_follows_the_one_process_curve_and_resumes(runs):
    root, one, _, first_rows, second = runs
    ref = metrics_rows(root / "one")
    assert len(ref) == 8 and sum("val_loss" in r for r in ref) == 4 and ref[-1]["loss"] < ref[0]["loss"] - 1
    assert_same_curve(first_rows, ref[:4])
    assert_same_curve(metrics_rows(root / "two"), ref)  # resumed from the step-3 checkpoint, over bf16-stored NF4
    summary = second[0]["summary"]
    assert summary["processes"] == 2 and summary["final_val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-5)
    assert summary["trainable_parameters"] == one["summary"]["trainable_parameters"] == 8192  # LoRA only


def test_each_rank_holds_only_its_shard_of_the_packed_nf4_bytes(runs):
    _, one, first, _, second = runs
    assert one["shards"] == {}  # one process: nothing prepared, nothing sharded
    assert all(c == [True, True, False] for cs in one["seen"].values() for c in cs)
    for rank, rep in enumerate(first + second):
        _check_rank(rep, rank % 2)


def test_the_adapter_rank_0_saved_loads_back(runs, tiny_model):
    """The adapter gathered from the FSDP2 shards equals the 1-process one and loads over the NF4 base."""
    import torch
    from safetensors.torch import load_file

    from loraforge.model.adapters import load_adapter

    root = runs[0]
    ref_w, got_w = (load_file(root / r / "adapter" / "adapter_model.safetensors") for r in ("one", "two"))
    assert set(got_w) == set(ref_w) and len(got_w) == 28  # lora_A and lora_B of 14 linears
    for k in ref_w:
        assert got_w[k].numpy() == pytest.approx(ref_w[k].numpy(), rel=1e-4, abs=1e-6), k
        assert got_w[k].abs().max() > 0, k  # trained (lora_B starts at zero)

    base, tok = nf4_base(str(tiny_model))
    ids = tok("What colour is the sky?", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = base(ids).logits
        loaded = load_adapter(base, root / "two" / "adapter")
        state = dict(loaded.named_parameters())
        for k, v in got_w.items():
            assert torch.equal(state[k.replace(".weight", ".default.weight")], v), k
        tuned = loaded(ids).logits
    assert torch.isfinite(tuned).all() and (tuned - plain).abs().max() > 1e-3  # the adapter is live


def test_fsdp2_over_nf4_on_the_fast_path(tiny_model, tmp_path):
    """The fast Llama path over a sharded NF4 base (FastLlama.attach_fsdp; the quantisation state kept aside
    by shard_nf4): the one-process fast curve, each rank holding half of the original packed bytes."""
    from conftest import chat_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    [one] = _launch(_write_cfg(tmp_path, tiny_model, data, "one", fast="on", max_steps=4), tmp_path / "rep-one", 1)
    two = _launch(_write_cfg(tmp_path, tiny_model, data, "two", fast="on", max_steps=4), tmp_path / "rep-two", 2)
    ref = metrics_rows(tmp_path / "one")
    assert one["summary"]["fast_path"] and two[0]["summary"]["fast_path"]
    assert len(ref) == 4 and ref[-1]["loss"] < ref[0]["loss"]
    assert_same_curve(metrics_rows(tmp_path / "two"), ref)
    for rep in two:
        assert len(rep["shards"]) == 14 and rep["seen"] == {}  # the fast path never calls Linear4bit.forward
        for name, s in rep["shards"].items():
            assert s["local"] == s["full"] // 2 and s["bytes_match"] and not s["grad"], (name, s)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:] == ["--resume"])
