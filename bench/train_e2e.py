"""The benchmark of record for training speed: what users run, end to end, against the peers in one device call.

`loraforge train CONFIG` (a real config file; wall time from the command's start to the adapter written, and
tokens/s of training alone from its summary.json) against Unsloth + TRL's SFTTrainer set up the way Unsloth's
notebooks do it (FastLanguageModel, get_peft_model with its offloaded checkpointing, adamw_8bit,
train_on_responses_only) and plain TRL + PEFT (SFTTrainer with a LoraConfig, prompt-completion data: loss on
the answer only). Same data, chat template, max_seq_length, r = alpha = 16 on all linear layers, dropout 0.05,
learning rate, epochs and effective batch; each tool in its own process.

    python bench/train_e2e.py prepare --out .e2e            # on any machine: the runs' data files (needs ../shared)
    python bench/train_e2e.py run --data .e2e --smol DIR --runs 135m-banking77,135m-snips --out $OUT/x.json

Runs (`RUNS`): SmolLM2-135M-Instruct (real weights, DIR = its HF folder; a tokenizer-only DIR gives its shape
with random weights, `weights: random` in the row) on all of BANKING77 and on SNIPS 2017
turned into slot-extraction chats (answers are JSON); a Llama-3.2-1B shape and a Llama-3.1-8B shape QLoRA
(random weights, SmolLM2's tokenizer and chat template) on an Alpaca-like length mix (bench/_mix.py's lengths,
median ~250 tokens), packing off and on. tokens/s counts each tool's real (non-pad) training tokens: the
training set's tokens x epochs over the time of its training loop (for the peers, trainer.train()). The final
validation loss is the mean loss of the answer tokens of the same held-out file, read by each tool.
Prints one JSON object: {"command", "device", "rows": [...]} (the format of bench/results/train_e2e/).
Tool `loraforge-tensorboard` is loraforge with `train.report_to: [tensorboard]`: what reporting to a tracker
costs a real run (issue 22's < 1% at 8B), beside the plain `loraforge` row of the same call; `loraforge-shareprefix`
is loraforge with `data.share_prefix: on` (its default, auto, shares only on the CPU); likewise `-nographs`,
`-graphs`, `-adam8`, `-chunk2k`, `-eval50`, `-save50` set one config key each (VARIANTS), joined as in
`loraforge-graphs-adam8`: what each default costs or saves, in the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _peers import loraforge_train, peer_model, print_result, run_child  # noqa: E402
SYSTEM = {"banking77": "Classify the customer's banking query. Reply with the intent label only.",
          "snips": "Extract the slots of the request as a JSON object (slot name: text). Reply with the JSON only."}
RUNS = {   # model: smollm2 (the HF folder given) or a bench/train_speed.py shape built with random weights
    "135m-banking77": dict(model="smollm2", data="banking77", seq=256, batch=16, accum=1),
    "135m-snips": dict(model="smollm2", data="snips", seq=256, batch=16, accum=1),
    "1b-mix": dict(model="1b", data="mix", seq=2048, batch=4, accum=2),
    "1b-mix-packed": dict(model="1b", data="mix", seq=2048, batch=1, accum=2, packing=True),
    "8b-mix": dict(model="8b", data="mix8b", seq=2048, batch=2, accum=4, qlora=True),
    "8b-mix-packed": dict(model="8b", data="mix8b", seq=2048, batch=1, accum=4, qlora=True, packing=True),
}
VARIANTS = {"shareprefix": ("data", "share_prefix", "on"), "nographs": ("model", "cuda_graphs", "off"),
            "graphs": ("model", "cuda_graphs", "on"),
            "adam8": ("train", "optimizer", "adamw_8bit"), "chunk2k": ("model", "mlp_chunk_tokens", 2048),
            "eval50": ("train", "eval_every", 50), "save50": ("train", "save_every", 50)}   # the defaults before auto
TOOLS = ["loraforge", "unsloth-trl", "trl"]   # and loraforge-tensorboard (not by default)
LR, R, DROPOUT, SEED = 2e-4, 16, 0.05, 3407


# ---- data (prepare) ---------------------------------------------------------------------------------------
def _chat(system: str, user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _snips(shared: Path) -> list[dict]:
    rows = []
    for f in sorted(shared.glob("train_*_full.json")):
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:   # one file is not valid UTF-8 as published (a Latin-1 byte)
            text = raw.decode("latin-1")
        for intent, queries in json.loads(text).items():
            for q in queries:
                slots = {}
                for piece in q["data"]:
                    if "entity" in piece:
                        slots.setdefault(piece["entity"], piece["text"].strip())
                rows.append(_chat(SYSTEM["snips"], "".join(p["text"] for p in q["data"]).strip(),
                                  json.dumps(slots, ensure_ascii=False)))
    return rows


def _mix(n: int, seed: int, words: list[str]) -> list[dict]:
    """Alpaca-like chats whose lengths follow bench/_mix.py's mix (in words ~ tokens), a third prompt."""
    from _mix import sample_lengths

    rng = random.Random(seed)
    lengths = sample_lengths(10 ** 9, seed)[:n]
    rows = []
    for n_tok in lengths:
        body = [rng.choice(words) for _ in range(max(8, int(n_tok * 0.75)))]   # ~1.3 tokens a word
        cut = len(body) // 3
        rows.append(_chat("You are a helpful assistant.", " ".join(body[:cut]), " ".join(body[cut:])))
    return rows


def prepare(out: Path, shared: Path) -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    from loraforge.quickstart import make_splits

    out.mkdir(parents=True, exist_ok=True)
    train, val, _ = make_splits(0, 1)
    chats = lambda rows: [_chat(SYSTEM["banking77"], r["text"], r["category"]) for r in rows]  # noqa: E731
    _write(out / "banking77-train.jsonl", chats(train))
    _write(out / "banking77-val.jsonl", chats(val))
    snips = _snips(shared / "data" / "snips2017")
    random.Random(SEED).shuffle(snips)
    _write(out / "snips-train.jsonl", snips[500:])
    _write(out / "snips-val.jsonl", snips[:500])
    words = sorted({w for r in train for w in r["text"].split() if w.isalpha()})
    for name, n in (("mix", 2400), ("mix8b", 640)):
        rows = _mix(n + 64, SEED, words)
        _write(out / f"{name}-train.jsonl", rows[64:])
        _write(out / f"{name}-val.jsonl", rows[:64])
    print(json.dumps({p.name: sum(1 for _ in p.open()) for p in sorted(out.glob("*.jsonl"))}))


# ---- one tool on one run (its own process) -----------------------------------------------------------------
def loraforge_config(spec: dict, work: Path, variant: tuple[str, ...] = ()) -> dict:
    """The run's `loraforge train` config (run_loraforge's; bench/validation_speed.py builds the same run)."""
    report_to = [v for v in variant if v not in VARIANTS]
    cfg = {"base_model": spec["model_dir"], "output_dir": str(work / "run"), "seed": SEED,
           "model": {"quantization": "nf4" if spec.get("qlora") else "none",
                     "gradient_checkpointing": "offload" if spec.get("qlora") else False},
           "data": {"train": spec["train"], "validation": spec["val"], "max_seq_length": spec["seq"],
                    "packing": bool(spec.get("packing"))},
           "lora": {"r": R, "alpha": R, "dropout": DROPOUT},
           "train": {"epochs": spec["epochs"], "learning_rate": LR, "batch_size": spec["batch"],
                     "grad_accum": spec["accum"], "report_to": report_to}}
    for v in variant:
        if v in VARIANTS:
            section, key, value = VARIANTS[v]
            cfg[section][key] = value
    return cfg


def run_loraforge(spec: dict, work: Path, variant: tuple[str, ...] = ()) -> dict:
    """`loraforge train` on the run's config; variant: trackers to report to, and settings a user may change
    (VARIANTS: e.g. `shareprefix` for data.share_prefix on, a GPU run of the same data with the common system
    turn computed once a batch; `nographs-adam8` for the memory each default costs)."""
    cfg = loraforge_config(spec, work, variant)
    from loraforge.model.fast.kernel_cache import compiled_kernels
    cached = sorted(compiled_kernels())   # before the run: an empty list is a machine's first run (cold Triton cache)
    s, wall, log = loraforge_train(cfg, work, *(["--profile", str(spec["profile"])] if spec.get("profile") else []))
    if s is None:
        return {"error": log[-3000:], "kernels_cached_before": cached}
    return {"kernels_cached_before": cached, "wall_seconds": round(wall, 1), "train_seconds": s["train_seconds"],
            "tokens": s["tokens_seen"],
            "tokens_per_s": s["tokens_per_s"], "peak_reserved_gib": s["peak_reserved_gib"],
            "peak_allocated_gib": s.get("peak_allocated_gib"),
            "final_val_loss": s["final_val_loss"], "planned_tokens_per_s": s["planned_tokens_per_s"],
            "seconds_in": s.get("seconds_in"), "steps": s.get("steps"), "plan_speed": s.get("plan_speed"),
            "clock": _clock(work / "run" / "metrics.jsonl")}


def _clock(path: Path) -> list:
    """[step, seconds since training started] of each metrics row: where a short run's time goes (warm-up)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [[r["step"], r["elapsed_s"]] for r in rows if "elapsed_s" in r]


def run_peer(tool: str, spec: dict, work: Path) -> dict:
    """Unsloth + TRL (as its notebooks) or plain TRL + PEFT; runs in this process (`child`)."""
    import torch

    cuda = torch.cuda.is_available()   # (CPU: a smoke test of the set-up only)
    t_start = time.time()
    model, tok, kw = peer_model(tool, spec["model_dir"], spec["seq"], qlora=bool(spec.get("qlora")), r=R,
                                dropout=DROPOUT, seed=SEED)
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    data = load_dataset("json", data_files={"train": spec["train"], "val": spec["val"]})
    if tool == "unsloth-trl":   # the notebooks: the chat template applied to text, then responses only
        data = data.map(lambda r: {"text": tok.apply_chat_template(r["messages"], tokenize=False)},
                        remove_columns=["messages"])
    else:                       # TRL's prompt-completion form: loss on the completion only
        data = data.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                        remove_columns=["messages"])
    args = SFTConfig(output_dir=str(work / "out"), per_device_train_batch_size=spec["batch"],
                     per_device_eval_batch_size=spec["batch"], gradient_accumulation_steps=spec["accum"],
                     num_train_epochs=spec["epochs"], learning_rate=LR, warmup_steps=0.05, weight_decay=0.01,
                     lr_scheduler_type="cosine", optim="adamw_8bit" if tool == "unsloth-trl" else "adamw_torch_fused",
                     bf16=cuda, logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none",
                     seed=SEED, max_length=spec["seq"], packing=bool(spec.get("packing")),
                     gradient_checkpointing=bool(spec.get("qlora")) and tool == "trl",
                     dataset_text_field="text", dataset_num_proc=4)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data["train"], eval_dataset=data["val"],
                         args=args, **kw)
    if tool == "unsloth-trl":
        from unsloth.chat_templates import train_on_responses_only

        trainer = train_on_responses_only(trainer, instruction_part="<|im_start|>user\n",
                                          response_part="<|im_start|>assistant\n")
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) * spec["epochs"]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    secs = time.time() - t0
    peak = torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else None
    val = trainer.evaluate()["eval_loss"]
    return {"wall_seconds": round(time.time() - t_start, 1), "train_seconds": round(secs, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / secs, 1), "peak_reserved_gib": peak and round(peak, 3),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if cuda else None,
            "final_val_loss": val,
            "allocator": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


# ---- the device run ----------------------------------------------------------------------------------------
def has_weights(folder: str) -> bool:
    return any(Path(folder).glob("*.safetensors")) or any(Path(folder).glob("*.bin"))


def model_dir(name: str, smol: str, cache: Path) -> str:
    """The run's model folder: SmolLM2's (real weights) or a train_speed.py shape with random weights, built
    once into the cache. Where --smol holds the tokenizer only (the device has no room for the GGUF next to the
    site packages), the 135m rows use SmolLM2-135M's shape with random weights: the same speed and memory,
    validation losses comparable only between the tools of that call (the row says `weights: random`)."""
    if name == "smollm2":
        if has_weights(smol):
            return smol
        name = "135m"
    out = cache / f"model-{name}"
    if not (out / "config.json").is_file():
        from train_speed import make_model

        make_model(name, out, smol)
    return str(out)


def bench_rate(spec: dict, shape: str, seq: int = 128) -> float | None:
    """bench/train_speed.py's ours-lora row for the same shape and batch size (the loop users never run), at
    `seq` tokens a row: 128 (the issue's first comparison) and 64 (BANKING77's batches: 52 tokens on average,
    padded to a bucket, so 16 x 64 is the batch the product trains on)."""
    if shape != "135m":
        return None
    out = subprocess.run([sys.executable, str(HERE / "train_speed.py"), "--tokenizer", spec["model_dir"],
                          "--shapes", shape, "--rows", "ours-lora", "--batch", str(spec["batch"]), "--seq", str(seq),
                          "--steps", "30", "--warmup", "5"], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)["rows"][0]["tokens_per_s"]
    except (ValueError, KeyError, IndexError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--smol", required=True, help="SmolLM2-135M-Instruct's HF folder (also the tokenizer)")
    r.add_argument("--runs", default="135m-banking77,135m-snips")
    r.add_argument("--tools", default=",".join(TOOLS))
    r.add_argument("--epochs", type=float, default=1.0)
    r.add_argument("--cache", type=Path, default=Path("/tmp/lf-e2e"))
    r.add_argument("--timeout", type=int, default=900, help="seconds per tool and run")
    r.add_argument("--bench-rate", action="store_true", help="also time train_speed.py's ours-lora row (135m)")
    r.add_argument("--profile", type=Path, help="loraforge rows: `loraforge train --profile` into DIR/RUN")
    r.add_argument("--out", type=Path)
    c = sub.add_parser("child")
    c.add_argument("tool")
    c.add_argument("spec", type=Path)
    a = ap.parse_args()
    if a.cmd == "prepare":
        return prepare(a.out, a.shared)
    if a.cmd == "child":
        spec = json.loads(a.spec.read_text())
        print_result(run_peer(a.tool, spec, a.spec.parent))
        return
    import torch

    rows = []
    for run in a.runs.split(","):
        conf = RUNS[run]
        spec = {**conf, "epochs": a.epochs, "model_dir": model_dir(conf["model"], a.smol, a.cache),
                "train": str(a.data / f"{conf['data']}-train.jsonl"), "val": str(a.data / f"{conf['data']}-val.jsonl"),
                "profile": str(a.profile / run) if a.profile else None}
        for tool in a.tools.split(","):
            work = a.cache / run / tool
            work.mkdir(parents=True, exist_ok=True)
            (work / "spec.json").write_text(json.dumps(spec))
            if tool.startswith("loraforge"):
                res = run_loraforge(spec, work, tuple(tool.split("-")[1:]))
            else:
                res = run_child([sys.executable, __file__, "child", tool, str(work / "spec.json")], work, a.timeout)
            if tool == "loraforge" and a.bench_rate and "error" not in res:
                shape = "135m" if conf["model"] == "smollm2" else conf["model"]
                res["bench_tokens_per_s"] = bench_rate(spec, shape)
                res["bench_tokens_per_s_seq64"] = bench_rate(spec, shape, 64)
            weights = "real" if conf["model"] == "smollm2" and has_weights(a.smol) else "random"
            rows.append({"run": run, "tool": tool, "weights": weights, **res})
            print(json.dumps(rows[-1])[:400], file=sys.stderr, flush=True)
            if a.out:   # each row as it comes: a call cut short keeps what it measured
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    out = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else "cpu", "epochs": a.epochs, "rows": rows, "ratios": ratios(rows)}
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)


def ratios(rows: list[dict]) -> dict:
    """Per run: loraforge's tokens/s and peak memory over each peer's (rows that finished)."""
    out = {}
    ok = {(r["run"], r["tool"]): r for r in rows if "error" not in r}
    for (run, tool), r in ok.items():
        ours = ok.get((run, "loraforge"))
        if tool != "loraforge" and ours:   # for loraforge-tensorboard: the cost of reporting
            out[f"{run}:{tool}"] = {"speed": round(ours["tokens_per_s"] / r["tokens_per_s"], 3),
                                    "memory": r["peak_reserved_gib"] and
                                    round(ours["peak_reserved_gib"] / r["peak_reserved_gib"], 3),
                                    "val_loss_delta": round(ours["final_val_loss"] / r["final_val_loss"] - 1, 4)}
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
