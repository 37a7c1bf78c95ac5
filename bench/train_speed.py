"""Training speed and memory: loraforge's fast path vs plain transformers+PEFT(+bitsandbytes) vs Unsloth,
in one device run, same random-weight model folder, same batches, same loop (forward, backward, AdamW).

    python bench/train_speed.py --tokenizer TOKDIR --out $OUT/train_speed [--shapes 8b,1b] [--rows ...]
    python bench/train_speed.py --tokenizer TOKDIR --shapes 8b-mix,1b-mix [--pack-len 4096] [--rows ...]

Each row runs in its own process (clean CUDA memory statistics; Unsloth patches transformers when
imported, so it gets a process of its own and is imported first there). Rows:
  plain-qlora  transformers + peft + bitsandbytes NF4, prepare_model_for_kbit_training, HF checkpointing
  plain-lora   bf16 base, HF gradient checkpointing        plain-dora   the same with use_dora
  ours-qlora   loraforge: NF4 via load_base, FastLlama (checkpointing offloaded to pinned CPU memory)
  ours-qlora-gc  the same with the layer inputs kept on the GPU
  ours-*-nographs / ours-*-graphs  the same with model.cuda_graphs off / on (CUDA graphs of the decoder
               stack; the plain ours rows run `auto`, which takes them for host-bound shapes such as 1b)
  ours-*-nochunk  the same with model.mlp_chunk_tokens 0 (the MLP never in chunks; `auto` chunks beyond 16K tokens)
  ours-*-spanN    the same with model.checkpoint_every N (one layer input kept per N layers)
  ours-lora / ours-dora       bf16 base, FastLlama
  unsloth-qlora / unsloth-lora  Unsloth's FastLanguageModel, its offloaded checkpointing, max_seq_length = the
               row's length (--seq, or --pack-len for the mix shapes)
r = alpha = 16 on all seven linear projections, dropout 0, lr 2e-4, batch B x T random token ids with
every token a loss token. tokens/s counts real tokens only (here all of them); memory is the peak
reserved/allocated during training (the weights included), after loading.

Shapes 8b-mix / 1b-mix: the 8b / 1b model (same model folder), trained on a realistic length mix (bench/_mix.py:
lognormal example lengths, median 250, sigma 0.6, clipped to [32, 1024]; ~85% within 100-600 tokens) packed
by loraforge's packer into one row of at most --pack-len tokens per step, padding-free, identical rows for
every tool. Position ids restart per example; the first token of each example is no label, so every tool's
loss is the mean over the same label tokens and first_loss compares across rows. The ours rows pass
position_ids + segment_ids (per-example attention), Unsloth position_ids + packed_seq_lengths (its varlen
attention), plain transformers position_ids (its masks detect packed rows from position ids resets; the row
says `packed_attention` false where the installed transformers does not). Mix rows add pack_len,
real_tokens_per_step and length_mix {mean, p10, p50, p90} of the examples trained on.
With --rounds N the row list runs N times, interleaved, and the ratios compare median rates: one row's
rate moved by 5-16% between calls (Unsloth's QLoRA 8,749 and 10,142 tokens/s on the same H100 kind).
Prints one JSON object; with --out also writes train_speed.json there.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # public configs: Llama-3.1-8B, Llama-3.2-1B and SmolLM2-135M (a Llama too)
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False,
               max_position_embeddings=8192, rms_norm_eps=1e-5),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
               max_position_embeddings=8192, rms_norm_eps=1e-5),
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
                 max_position_embeddings=8192, rms_norm_eps=1e-5),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_ROWS = ["plain-qlora", "ours-qlora", "ours-qlora-gc", "unsloth-qlora", "plain-lora", "ours-lora",
                "unsloth-lora"]


def make_model(shape: str, out: Path, tokenizer: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], initializer_range=0.02))
    model.save_pretrained(out, max_shard_size="4GB")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)


def batches(vocab: int, bsz: int, seq: int, n: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, min(vocab, 32000), (bsz, seq), generator=g) for _ in range(n)]


def dense_batches(vocab: int, bsz: int, seq: int, n: int) -> list[dict]:
    return [{"input_ids": ids, "labels": ids} for ids in batches(vocab, bsz, seq, n)]


def plain_packed_attention() -> bool:
    """Whether the installed transformers keeps packed examples apart given only position_ids (as the plain
    rows call it): a tiny random Llama on CPU, a row of two examples against the second one alone."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).float().eval()
    tiny.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        row = tiny(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), use_cache=False).logits
        alone = tiny(input_ids=ids[:, 4:], use_cache=False).logits
    return bool(torch.allclose(row[:, 4:], alone, atol=1e-4))


def build(row: str, path: str, mix: bool = False, max_len: int = 8192):
    """(model, trainable params, loss(batch) -> scalar mean loss over the batch's label tokens). `max_len`: the
    longest row (Unsloth's max_seq_length)."""
    import torch

    keys = ["input_ids", "labels"] + (["position_ids"] if mix else [])

    tool, method = row.split("-", 1)
    if tool == "unsloth":
        from unsloth import FastLanguageModel  # noqa: first import in this process

        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=max_len, dtype=torch.bfloat16,
                                                     load_in_4bit=method == "qlora", local_files_only=True)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                 random_state=0)
        model.train()  # from_pretrained leaves eval mode, where transformers skips checkpointing
        if mix:  # padding-free: the example lengths of the row, int32 on the GPU
            return model, [p for p in model.parameters() if p.requires_grad], \
                lambda b: model(**{k: b[k] for k in keys}, packed_seq_lengths=b["seq_lens"]).loss
        return model, [p for p in model.parameters() if p.requires_grad], \
            lambda b: model(**{k: b[k] for k in keys}).loss
    if tool == "plain":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        extra = {}
        if method == "qlora":
            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
                                                     attn_implementation="sdpa", **extra)
        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 use_dora=method == "dora", task_type="CAUSAL_LM"))
        model.train()  # from_pretrained leaves eval mode, where transformers skips checkpointing
        # mix: no KV cache, or transformers skips its packed-row detection (checkpointing turns it off anyway)
        extra = {"use_cache": False} if mix else {}
        return model, [p for p in model.parameters() if p.requires_grad], \
            lambda b: model(**{k: b[k] for k in keys}, **extra).loss
    from loraforge.config import LoraSection
    from loraforge.model.adapters import attach_adapter
    from loraforge.model.fast import FastLlama
    from loraforge.model.load import load_base

    quant = "nf4" if method.startswith("qlora") else "none"
    model, _, _ = load_base(path, device="cuda", quantization=quant)
    model = attach_adapter(model, LoraSection(adapter="dora" if method == "dora" else "lora", r=16, alpha=16,
                                              dropout=0.0))
    model.train()
    flags = method.split("-")[1:]
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing=True if "gc" in flags else "offload",
                     graphs="off" if "nographs" in flags else "on" if "graphs" in flags else "auto",
                     mlp_chunk_tokens=0 if "nochunk" in flags else "auto",
                     checkpoint_every=next((int(f[4:]) for f in flags if f.startswith("span")), 1))

    keys += ["segment_ids"] if mix else []

    def loss(b):
        s, n = fast.loss_sum({k: b[k] for k in keys})
        return s / n
    return model, [p for p in model.parameters() if p.requires_grad], loss


def run_row(row: str, path: str, bsz: int, seq: int, warmup: int, steps: int, profile: Path | None = None,
            pack_len: int | None = None) -> dict:
    """One row; pack_len set: on the length mix (bench/_mix.py), one packed row per step."""
    import torch

    t_load = time.time()
    model, params, loss_fn = build(row, path, mix=pack_len is not None, max_len=pack_len or seq)
    load_s = time.time() - t_load
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    if pack_len:
        from _mix import length_stats, mix_batches, mix_rows

        rows, lengths = mix_rows(warmup + steps, pack_len)
        data = mix_batches(rows)
    else:
        data = dense_batches(model.config.vocab_size, bsz, seq, warmup + steps)
    real = [int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in data]
    data = [{k: v.cuda() for k, v in b.items()} for b in data]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for i, b in enumerate(data):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.time()
        loss = loss_fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    torch.cuda.synchronize()
    secs = time.time() - t0
    if profile:  # two more steps under torch.profiler: where the GPU time goes, kernel by kernel
        from torch.profiler import ProfilerActivity, profile as prof, record_function

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for b in data[:2]:   # the timed loop's steps, its phases marked for _timeline's idle split
                with record_function("phase:forward"):
                    loss = loss_fn(b)
                with record_function("phase:backward"):
                    loss.backward()
                with record_function("phase:optimizer"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                float(loss)
            torch.cuda.synchronize()
        profile.mkdir(parents=True, exist_ok=True)
        table = p.key_averages()
        (profile / f"{row}.txt").write_text(table.table(sort_by="cuda_time_total", row_limit=45,
                                                        max_name_column_width=70))
        # the host's side: where the CPU time of a step goes (a step whose GPU waits for launches)
        (profile / f"{row}.cpu.txt").write_text(table.table(sort_by="self_cpu_time_total", row_limit=45,
                                                            max_name_column_width=70))
        from _timeline import idle_summary  # the GPU's idle gaps and who kept it waiting

        trace = Path(f"/tmp/lf-trace-{row}.json")
        try:  # a trace this code cannot read must not cost the row its timing
            p.export_chrome_trace(str(trace))
            idle = idle_summary(json.loads(trace.read_text()), steps=2)
            with gzip.open(profile / f"{row}.trace.json.gz", "wb") as f:   # for chrome://tracing, Perfetto
                f.write(trace.read_bytes())
        except Exception as e:  # noqa: BLE001
            idle = {"error": repr(e)}
        trace.unlink(missing_ok=True)
        (profile / f"{row}.idle.json").write_text(json.dumps(idle, indent=1))
        (profile / f"{row}.memory.json").write_text(json.dumps(_peak_memory(loss_fn, opt, data[0]), indent=1))
    timed = sum(real[warmup:])  # real (non-pad) tokens of the timed steps
    head = {"row": row, "batch": bsz, "seq": seq} if not pack_len else {
        "row": row, "batch": 1, "pack_len": pack_len, "real_tokens_per_step": round(timed / steps, 1),
        "length_mix": length_stats(lengths),
        "packed_attention": plain_packed_attention() if row.startswith("plain-") else True}
    return head | {"steps_timed": steps, "seconds": round(secs, 3), "tokens_per_s": round(timed / secs, 1),
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                   "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                   "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
                   "load_s": round(load_s, 1), "trainable": sum(p.numel() for p in params)} | \
        ({"idle": {k: idle[k] for k in ("wall_ms_per_step", "compute_busy_ms_per_step", "idle_ms_per_step",
                                         "idle_host_bound_ms_per_step") if k in idle}} if profile else {})


def _peak_memory(loss_fn, opt, batch) -> dict:
    """One more step with the allocator's history on: what is alive at its peak, by allocating line."""
    import torch
    from _memory import peak_breakdown

    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
        loss_fn(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return peak_breakdown(snap, base)
    except Exception as e:  # noqa: BLE001 - the row keeps its timing either way
        return {"error": repr(e)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shapes", default="8b", help="comma-separated: 8b, 1b (dense B x T), 8b-mix, 1b-mix (packed)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--tokenizer", help="a tokenizer folder for the random-weight model folders")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lf-bench"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--pack-len", type=int, default=4096, help="packed row length of the *-mix shapes")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=1, help="run the whole row list this many times, interleaved "
                    "(ours, peer, ours, peer...); ratios then use each row's median rate (and its largest memory)")
    ap.add_argument("--profile", type=Path, help="also write per row into this folder: torch.profiler tables "
                    "(GPU time, host CPU time), the trace (<row>.trace.json.gz), the GPU's idle time "
                    "(<row>.idle.json) and what is alive at the memory peak (<row>.memory.json)")
    ap.add_argument("--child", nargs=2, metavar=("ROW", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--mix", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for shape in a.shapes.split(","):
        if shape.removesuffix("-mix") not in SHAPES:
            ap.error(f"unknown shape {shape!r}; known: {', '.join(s + m for s in SHAPES for m in ('', '-mix'))}")
    if a.pack_len < 1024:
        ap.error("--pack-len must be at least 1024, the longest example of the length mix")
    if a.make:
        return make_model(a.make[0], Path(a.make[1]), a.tokenizer)
    if a.child:
        print("RESULT " + json.dumps(run_row(a.child[0], a.child[1], a.batch, a.seq, a.warmup, a.steps,
                                             a.profile, a.pack_len if a.mix else None)))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
               PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    rows = []
    for shape in a.shapes.split(","):
        base = shape.removesuffix("-mix")  # a mix shape trains the same model folder as its base shape
        folder = a.workdir / f"llama-{base}"
        prof_dir = a.profile / shape if a.profile else None
        if not (folder / "config.json").is_file():
            subprocess.run([sys.executable, __file__, "--make", base, str(folder), "--tokenizer", a.tokenizer],
                           check=True, env=env)
        for rnd, row in itertools.product(range(a.rounds), a.rows.split(",")):
            cmd = [sys.executable, __file__, "--child", row, str(folder), "--batch", str(a.batch), "--seq",
                   str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps)] + \
                (["--profile", str(prof_dir)] if prof_dir else []) + \
                (["--mix", "--pack-len", str(a.pack_len)] if shape != base else [])
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
                found = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                res = json.loads(found[-1][7:]) if found else {"row": row, "error": (p.stderr or p.stdout)[-1500:]}
            except subprocess.TimeoutExpired:
                res = {"row": row, "error": f"timeout after {a.timeout}s"}
            res["shape"] = shape
            if a.rounds > 1:
                res["round"] = rnd
            rows.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    result = {"rows": rows, "ratios": ratios(rows)}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "train_speed.json").write_text(text)


def ratios(rows: list[dict]) -> dict:
    """Each ours-* row against the peers' row of its method and shape: speed = ratio of the median tokens/s over
    the rounds, reserved = ratio of the largest peak reserved; with several rounds also each round's speed ratio
    (how much of a difference is noise between runs of one row), for the rounds where both rows ran."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "tokens_per_s" in r:
            groups.setdefault((r["shape"], r["row"]), []).append(r)
    out = {}
    for (shape, row), ours in groups.items():
        if not row.startswith("ours-"):
            continue
        method = row.split("-")[1]   # ours-qlora-gc, ours-qlora-nographs: against the peers' qlora
        for peer in ("plain", "unsloth"):
            theirs = groups.get((shape, f"{peer}-{method}"))
            if not theirs:
                continue
            entry = {"speed": round(_median_rate(ours) / _median_rate(theirs), 3),
                     "reserved": round(_peak(ours) / _peak(theirs), 3)}
            by_round = {t["round"]: t for t in theirs if "round" in t}
            pairs = [(o, by_round[o["round"]]) for o in ours if o.get("round") in by_round]
            if len(pairs) > 1:
                entry["speed_per_round"] = [round(o["tokens_per_s"] / t["tokens_per_s"], 3) for o, t in pairs]
            out[f"{shape}/{row} vs {peer}-{method}"] = entry
    return out


def _median_rate(rows: list[dict]) -> float:
    return statistics.median(r["tokens_per_s"] for r in rows)


def _peak(rows: list[dict]) -> float:
    return max(r["peak_reserved_gib"] for r in rows)


if __name__ == "__main__":
    main()
