"""Multi-GPU benchmark of `loraforge train`: tokens/s on 1 vs 2 GPUs (DDP) and peak memory per GPU with FSDP2.

    python bench/multi_gpu.py --out DIR                      # on a 2-GPU machine (launches torchrun itself)
    python bench/multi_gpu.py --out DIR --device cpu --tiny  # smoke test: 2 CPU processes, gloo, a tiny model
    python bench/multi_gpu.py --out DIR --nf4                # the same three cases over an NF4 base (QLoRA)
    python bench/multi_gpu.py --out DIR --nf4 --shape 70b --cases ddp-1,fsdp-N --cap 0 --steps 4 --warmup 2
                                                             # QLoRA of a shape too big for a small card

The model is Llama-3-8B-shaped (32 layers, hidden 4096, GQA 32/8, vocab 128256; --shape 70b: 80 layers, hidden
8192, GQA 64/8) with random bf16 weights built from a config one layer at a time (no download); LoRA r=16
on every linear layer, micro-batch 2 x 2048 tokens, two micro-batches per GPU per optimizer step, gradient
checkpointing (--checkpointing; by default each layer's input is offloaded to pinned CPU memory). Every
case is a real `run_training` under torchrun (the trainer's own DDP/FSDP2 path), measured from its
metrics.jsonl after warm-up steps:

    ddp-1   one GPU                         tokens/s, peak memory (the single-GPU reference)
    ddp-2   two GPUs, DDP                   tokens/s  -> scaling efficiency = tok/s(2) / (2 x tok/s(1))
    fsdp-2  two GPUs, FSDP2 (frozen base sharded per decoder layer) under a per-process memory cap of
            --cap x the single-GPU peak (torch.cuda.set_per_process_memory_fraction): a card too small
            for the single-GPU run          peak memory per GPU / single-GPU peak

With --nf4 every decoder linear is quantised to NF4 (bitsandbytes, double quantisation, as QLoRA does; on
the GPU, one layer at a time) in all three cases; for FSDP2 the quantised model is kept in CPU memory and
each rank's shard of the packed bytes moves to its GPU (loraforge.model.shard_nf4). Every case checks after
training that the packed bytes rank 0 holds for layer 0's q_proj are its share of the original ones
(`nf4_bytes_kept`). All cases run the trainer's default path (the fast Llama path on CUDA, under FSDP2 too).

Prints one JSON object and writes it to DIR/multi_gpu.json (each case's run folder stays in DIR/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA3_70B, "tiny": TINY}
NAMES = {"8b": "Llama-3-8B shape", "70b": "Llama-3-70B shape", "tiny": "tiny Llama"}
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
WORDS = [f"w{i}" for i in range(1000)]


def make_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (one token per word) with a chat template: exact sequence lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(folder)


def write_data(path: Path, n: int, seq: int) -> None:
    """n conversations of exactly `seq` tokens (prompt and answer of equal length)."""
    import random

    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    half = (seq - 6) // 2  # 6 template tokens: <|im_start|> role ... <|im_end|>, twice
    rows = [{"messages": [{"role": "user", "content": words(half)},
                          {"role": "assistant", "content": words(seq - 6 - half)}]} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_model(shape: dict, device: str, store_on: str, nf4: bool):
    """Random bf16 Llama built on the meta device and materialised one decoder layer at a time on `device`
    (the same seed per layer wherever it ends up, so every case trains the same weights), NF4-quantised
    there with `nf4` (every decoder linear, double quantisation, as QLoRA does; the model is then marked as
    transformers' bnb loader marks it, so PEFT wraps it with its bnb LoRA layer), and kept on `store_on`
    (the CPU for FSDP2: the trainer's fully_shard moves each rank's shard to its GPU, so no GPU ever holds
    the whole model). A 70B shape never exists whole in 16 bits anywhere."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from loraforge.model.quant import quantize_linears_

    cfg = LlamaConfig(**shape, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    layers = model.model.layers
    parts = [("layer", i, m) for i, m in enumerate(layers)] + \
        [("top", 0, m) for m in (model.model.embed_tokens, model.model.norm, model.lm_head)]
    for kind, i, module in parts:
        module.to_empty(device=device, recurse=True)
        torch.manual_seed(1000 * (kind == "top") + i)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") or name == "weight" and p.dim() == 1 else \
                    p.normal_(0.0, 0.02)
        if nf4 and kind == "layer":
            quantize_linears_(module, device, store_on=store_on)
        module.to(store_on)
    with torch.device(store_on):  # its inverse frequencies are computed, not loaded: rebuild them for real
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    if nf4:
        model.is_loaded_in_4bit = True
    q = layers[0].self_attn.q_proj
    return model, (q, q.weight.data.reshape(-1).view(torch.uint8).cpu().clone()) if nf4 else None


def nf4_bytes_kept(q, original, rank: int, world: int) -> bool:
    """After training: the packed bytes this rank holds for layer 0's q_proj are its share of the original
    ones (its FSDP2 shard, or the whole weight without sharding)."""
    import torch

    w = q.weight
    if not hasattr(w, "to_local"):  # not sharded: the whole weight
        return bool(torch.equal(w.data.reshape(-1).view(torch.uint8).cpu(), original))
    local = w.to_local().detach().reshape(-1).view(torch.uint8).cpu()
    share = original.reshape(-1, w.element_size() * w.shape[1]).chunk(world)[rank].reshape(-1)  # FSDP2's dim-0 chunk
    return bool(torch.equal(local, share))


def worker(args) -> None:
    """One case, inside torchrun: train with loraforge's own trainer, write rank 0's measurements."""
    import torch

    from loraforge.config import build_config
    from loraforge.model.load import load_tokenizer
    from loraforge.train.run import run_training

    out = Path(args.out)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if args.cap_gib:
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    mode = args.worker.split("-")[0]
    device = "cuda" if cuda else "cpu"
    model, probe = build_model(SHAPES[args.shape], device, "cpu" if mode == "fsdp" else device, args.nf4)
    tokenizer = load_tokenizer(str(out / "tokenizer"))
    tree = {"base_model": str(out / "tokenizer"), "output_dir": str(out / args.worker),
            "data": {"train": str(out / "data.jsonl"), "max_seq_length": args.seq, "train_on": "all",
                     "validation_split": 0},
            "model": {"gradient_checkpointing": args.checkpointing if args.checkpointing == "offload" else True,
                      "quantization": "nf4" if args.nf4 else "none"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "train": {"batch_size": args.batch, "grad_accum": 2 * world, "max_steps": args.steps, "epochs": 1000,
                      "learning_rate": 1e-4, "precision": "bf16" if cuda else "fp32", "device": args.device,
                      "distributed": mode, "save_every": 10**6, "eval_every": 10**6, "lr_scheduler": "constant",
                      "warmup_ratio": 0.0, "dist_timeout_s": 300}}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = run_training(build_config(tree), overwrite=True, base=(model, tokenizer, str(out / "tokenizer")))
    if cuda:  # every rank reports its own peak; the launcher gathers them after torchrun returns
        (out / f"{args.worker}.peak{rank}").write_text(str(torch.cuda.max_memory_allocated() / 2**30))
    kept = nf4_bytes_kept(*probe, rank, world) if probe else None
    if rank == 0:
        rows = [json.loads(x) for x in (out / args.worker / "metrics.jsonl").read_text().splitlines()]
        timed = rows[args.warmup:]
        per_step = args.batch * args.seq * 2 * world  # every row is exactly `seq` tokens
        span = timed[-1]["elapsed_s"] - rows[args.warmup - 1]["elapsed_s"]
        result = {"case": args.worker, "processes": world, "steps": len(rows), "timed_steps": len(timed),
                  "tokens_per_step": per_step, "tokens_per_s": round(per_step * len(timed) / max(span, 1e-9), 1),
                  "tokens_per_s_median_step": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
                  "cap_gib": args.cap_gib, "final_loss": rows[-1]["loss"], "wall_s": round(time.time() - t0, 1),
                  "summary_tokens_seen": res.summary["tokens_seen"], "fast_path": res.summary["fast_path"]}
        if kept is not None:
            result["nf4_bytes_kept"] = kept
        (out / f"{args.worker}.json").write_text(json.dumps(result, indent=1))


def launch(args, case: str, n: int, cap_gib: float | None = None) -> dict:
    out = Path(args.out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), __file__,
           "--worker", case, "--out", str(out), "--device", args.device, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq", str(args.seq), "--batch", str(args.batch),
           "--checkpointing", args.checkpointing, "--shape", args.shape, *(["--nf4"] if args.nf4 else []),
           *(["--cap-gib", str(cap_gib)] if cap_gib else [])]
    for stale in [out / f"{case}.json", *(out / f"{case}.peak{r}" for r in range(n))]:
        stale.unlink(missing_ok=True)
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout first, then the caller's PYTHONPATH
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    with (out / f"{case}.log").open("w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not (out / f"{case}.json").is_file():
        text = (out / f"{case}.log").read_text()
        tail = text[:text.find("torch/distributed/elastic")][-1500:]  # the worker's error, not torchrun's
        return {"case": case, "processes": n, "error": f"exit code {code}", "log_tail": tail}
    result = json.loads((out / f"{case}.json").read_text())
    peaks = [out / f"{case}.peak{r}" for r in range(n)]
    result["peak_gib_per_gpu"] = [round(float(f.read_text()), 2) for f in peaks] if peaks[0].is_file() else None
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--tiny", action="store_true", help="--shape tiny: a 2-layer model, short rows (smoke test)")
    ap.add_argument("--cases", default="ddp-1,ddp-N,fsdp-N", help="which of the three cases to run")
    ap.add_argument("--nf4", action="store_true", help="QLoRA: an NF4 base in every case (bitsandbytes)")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--checkpointing", choices=["on", "offload"], default="offload",
                    help="gradient checkpointing; offload parks each layer's input in pinned CPU memory (CUDA)")
    ap.add_argument("--cap", type=float, default=0.6, help="FSDP2 memory cap, as a fraction of the 1-GPU peak")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cap-gib", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.shape = "tiny"
    if args.shape == "tiny":
        args.seq = min(args.seq, 128)
    if args.worker:
        return worker(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out / "tokenizer")
    write_data(out / "data.jsonl", n=max(64, 4 * args.gpus * args.batch * args.steps), seq=args.seq)
    wanted = args.cases.split(",")
    one = launch(args, "ddp-1", 1) if "ddp-1" in wanted else {}
    two = launch(args, f"ddp-{args.gpus}", args.gpus) if "ddp-N" in wanted else {}
    cap = round(args.cap * one["peak_gib_per_gpu"][0], 2) if one.get("peak_gib_per_gpu") else None
    fsdp = launch(args, f"fsdp-{args.gpus}", args.gpus, cap) if "fsdp-N" in wanted else {}
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
              "model": f"{NAMES[args.shape]}, random bf16 weights", "lora_r": 16,
              "base": "nf4 (double quantisation), bf16 compute" if args.nf4 else "bf16",
              "micro_batch": f"{args.batch}x{args.seq}", "gradient_checkpointing": args.checkpointing,
              "cases": [c for c in (one, two, fsdp) if c]}
    if "tokens_per_s" in one and "tokens_per_s" in two:
        report["scaling_efficiency"] = round(two["tokens_per_s"] / (args.gpus * one["tokens_per_s"]), 3)
    if one.get("peak_gib_per_gpu") and fsdp.get("peak_gib_per_gpu"):
        report["fsdp_peak_over_single"] = round(max(fsdp["peak_gib_per_gpu"]) / one["peak_gib_per_gpu"][0], 3)
    if args.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
        report["torch"] = torch.__version__
    (out / "multi_gpu.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
