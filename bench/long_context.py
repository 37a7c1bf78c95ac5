"""Long inputs: peak memory and tokens/s of loraforge and Unsloth at given lengths, and the longest sequence
each trains (bisection, one process per try), batch 1, Llama-3.1-8B shape (its llama3 RoPE scaling),
random weights, QLoRA r = alpha = 16 on all linear projections (bench/train_speed.py's rows).

    python bench/long_context.py --out $OUT --quick        # one 10-minute device call
    python bench/long_context.py --out $OUT [--rows ours-qlora,unsloth-qlora] [--lengths 32768,131072]
                                 [--tries 6] [--bisect LO,HI] [--budget SECONDS] [--tokenizer TOKDIR]

Every length and every try runs in a process of its own through `bench/train_speed.py --child` (clean CUDA
statistics; Unsloth imported first, with max_seq_length = the length tried). A length row runs --warmup
steps and one timed step. A bisection try runs one step (no warm-up: its tokens/s includes the first
step's compilation) and counts as trained when the step ends; out of memory on the GPU or the host (a
killed process) is a failure; a try that runs past its time leaves the bisection where it was. The first
try is the length the row's measured peaks extrapolate to (linear in the length, to 98% of the card),
then halves the interval, on multiples of --granularity, while --tries and --budget last (a try whose
estimated time, from the row's measured steps, exceeds what is left is not started).
--quick = lengths 32,768 and 131,072, then ours-qlora-nochunk at 32,768 (--also), 3 tries, a 540 s budget.
Also reported: what `loraforge plan` predicts as the longest sequence (its activation model, chunked MLP
included), the host memory of each try (maximum resident set: the offloaded layer inputs, 8 KB a token
and layer at 8B, live there) and the length at which it would reach 90% of the machine's memory;
loraforge's tries beyond it keep one layer input per n layers (model.checkpoint_every, row
ours-qlora-spanN) with the smallest n that fits the host.
The model folder gets a tokenizer from --tokenizer, or a small byte-level BPE one trained here (no download).
Prints one JSON object; with --out also writes long_context.json there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_speed  # noqa: E402  (bench/train_speed.py: the model folder, the rows, the child process)

# Llama-3.1-8B's config, but 1,048,576 positions declared (its RoPE tables do not depend on that number): no
# tool extends its RoPE on its own for the lengths tried beyond 131,072
LLAMA31 = dict(train_speed.SHAPES["8b"], max_position_embeddings=1_048_576,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
ROWS = ["ours-qlora", "unsloth-qlora"]
GIB = 2**30


def word_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE tokenizer (GPT-2/Llama-3 style; the rows train on random ids, so only loading it
    matters), with bos/eos/pad and a chat template, saved where AutoTokenizer reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[2])
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(folder)
    return folder


def make(folder: Path, tokenizer: str | None) -> None:
    train_speed.SHAPES["8b-3.1"] = LLAMA31
    tok = tokenizer or str(word_tokenizer(folder.parent / "word-tokenizer"))
    train_speed.make_model("8b-3.1", folder, tok)


def attempt(row: str, folder: Path, seq: int, warmup: int, steps: int, timeout: float, env: dict) -> dict:
    """One process: `row` at batch 1 x `seq` tokens. status: ok, oom, timeout or error; host_max_rss_gib."""
    cmd = [sys.executable, str(HERE / "train_speed.py"), "--child", row, str(folder), "--batch", "1", "--seq",
           str(seq), "--warmup", str(warmup), "--steps", str(steps)]
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        status, usage = None, None
        while status is None:
            pid, code, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(code)
            elif time.time() - t0 > timeout:
                os.killpg(p.pid, signal.SIGKILL)
                _, code, usage = os.wait4(p.pid, 0)
                status = "timeout"
            else:
                time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    found = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    res = {"row": row, "seq": seq, "wall_s": round(time.time() - t0, 1),
           "host_max_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2) if usage else None}
    if found:
        return {**json.loads(found[-1][7:]), **res, "status": "ok"}
    text = stderr[-1200:] or stdout[-1200:]
    oom = "out of memory" in text.lower() or "outofmemory" in text.lower() or status == -signal.SIGKILL
    return {**res, "status": "timeout" if status == "timeout" else "oom" if oom else "error", "exit": status,
            "tail": text}


def step_seconds(r: dict) -> float:
    return r["seconds"] / r["steps_timed"]


def estimate_s(measured: list[dict], seq: int) -> float:
    """A try's expected time: loading and imports as measured, one step scaled from the longest measured
    length by (seq / length)^1.6 (between the projections' linear and attention's quadratic cost)."""
    r = max(measured, key=lambda m: m["seq"])
    return r["load_s"] + 25 + step_seconds(r) * (seq / r["seq"]) ** 1.6


def extrapolate(measured: list[dict], card_gib: float) -> int | None:
    """The length at which the measured peaks (linear in the length) reach 98% of the card."""
    pts = sorted({m["seq"]: m["peak_reserved_gib"] for m in measured}.items())
    if len(pts) < 2:
        return None
    (l1, p1), (l2, p2) = pts[0], pts[-1]
    slope = (p2 - p1) / (l2 - l1)
    return int(l2 + (0.98 * card_gib - p2) / slope) if slope > 0 else None


def host_limited(measured: list[dict], host_gib: float) -> int | None:
    """The length at which the tries' host memory (linear in the length) reaches 90% of the machine's."""
    pts = sorted({m["seq"]: m["host_max_rss_gib"] for m in measured if m.get("host_max_rss_gib")}.items())
    if len(pts) < 2 or pts[-1][1] <= pts[0][1]:
        return None
    (l1, p1), (l2, p2) = pts[0], pts[-1]
    return int(l2 + (0.9 * host_gib - p2) * (l2 - l1) / (p2 - p1))


def spans_needed(measured: list[dict], seq: int, host_gib: float) -> int:
    """For loraforge: the fewest layers per checkpoint (model.checkpoint_every) whose offloaded inputs leave
    the host's memory at 90% or less at `seq` (the tries' host memory linear in the length, all of its growth
    taken as the offloaded inputs, which shrink n-fold)."""
    pts = sorted({m["seq"]: m["host_max_rss_gib"] for m in measured if m.get("host_max_rss_gib")}.items())
    if len(pts) < 2 or pts[-1][1] <= pts[0][1]:
        return 1
    (l1, p1), (l2, p2) = pts[0], pts[-1]
    slope = (p2 - p1) / (l2 - l1)
    fixed = p1 - slope * l1
    room = 0.9 * host_gib - fixed
    if fixed + slope * seq <= 0.9 * host_gib:
        return 1
    return 64 if room <= 0 else math.ceil(slope * seq / room)


def bisect(row, folder, env, measured, failed, card_gib, a, deadline) -> dict:
    """The longest length that trains, between what the rows showed (or --bisect LO,HI) and the first failure."""
    lo = max([m["seq"] for m in measured], default=0)
    hi = min(failed, default=None)
    if a.bisect:
        lo, hi = a.bisect
    step = a.granularity
    guess = extrapolate(measured, card_gib)
    out = {"extrapolated_max": guess, "host_limited_max": host_limited(measured, a.host_gib), "tries": []}
    for _ in range(a.tries):
        if hi is not None and hi - lo <= step:
            break
        if guess is None or not (lo < guess < (hi or a.max_seq + 1)):
            guess = (lo + hi) // 2 if hi is not None else min(2 * max(lo, step), a.max_seq)
        guess = max(lo + step, guess // step * step)
        if hi is not None and guess >= hi:
            break
        left = deadline - time.time()
        need = estimate_s(measured, guess) if measured else a.timeout
        if need > left:
            out["stopped"] = f"budget: a try at {guess} would take ~{need:.0f} s, {left:.0f} s left"
            break
        n = spans_needed(measured, guess, a.host_gib) if row.startswith("ours-") else 1
        r = attempt(row + (f"-span{n}" if n > 1 else ""), folder, guess, 0, 1, min(a.timeout, left), env)
        print(json.dumps({k: v for k, v in r.items() if k != "tail"}), file=sys.stderr, flush=True)
        keys = ("seq", "row", "status", "peak_reserved_gib", "tokens_per_s", "wall_s", "host_max_rss_gib", "tail")
        out["tries"].append({k: r[k] for k in keys if r.get(k) is not None})
        if r["status"] == "ok":
            lo = guess   # (the host memory of a spanN try is not on the line the others are)
            measured = measured + [r if n == 1 else {**r, "host_max_rss_gib": None}]
        elif r["status"] == "oom":
            hi = guess
        else:
            out["stopped"] = f"try at {guess}: {r['status']}"
            break
        guess = None
    out.update(longest_trained=lo or None, shortest_failed=hi)
    return out


def plan_max(folder: Path, card_gib: float) -> int | None:
    """`loraforge plan`'s longest sequence for this setup on the card (its estimate, no GPU involved)."""
    try:
        from loraforge.plan.fit import max_seq
        from loraforge.plan.memory import TrainSetup
        from loraforge.plan.shapes import shape_from_config

        shape = shape_from_config(json.loads((folder / "config.json").read_text()), folder.name)
        setup = TrainSetup(method="qlora", batch=1, rank=16, lora_dropout=0.0, gradient_checkpointing=True,
                           fast_path=True, offload_checkpoints=True)
        return max_seq(shape, setup, card_gib)
    except Exception as e:  # noqa: BLE001 - the measurement stands without it
        print(f"plan: {e!r}", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="lengths 32768,131072, 3 tries, a 540 s budget")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--lengths", help="comma-separated lengths measured with --warmup + 1 timed step "
                    "(default 32768,131072)")
    ap.add_argument("--also", help="ROW:LENGTH,... single rows after the lengths (default none; --quick "
                    "ours-qlora-nochunk:32768, the MLP unchunked)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tries", type=int, help="bisection tries per row (default 6; --quick 3)")
    ap.add_argument("--bisect", help="LO,HI: bisect between these (a length known to train, one known to fail)")
    ap.add_argument("--granularity", type=int, default=8192)
    ap.add_argument("--max-seq", type=int, default=1_048_576)
    ap.add_argument("--budget", type=float, help="seconds for everything (default none; --quick 540)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    ap.add_argument("--tokenizer", help="a tokenizer folder for the model folder (default: a small BPE one)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lf-bench"))
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:
        return make(a.make, a.tokenizer)
    t0 = time.time()
    lengths = [int(x) for x in (a.lengths or "32768,131072").split(",") if x]
    a.tries = a.tries if a.tries is not None else 3 if a.quick else 6
    budget = a.budget if a.budget is not None else 540 if a.quick else float("inf")
    deadline = t0 + budget
    if a.bisect:
        a.bisect = tuple(int(x) for x in a.bisect.split(","))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
               PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", PYTHONUNBUFFERED="1")
    folder = a.workdir / "llama-8b-3.1"
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--make", str(folder)] +
                       (["--tokenizer", a.tokenizer] if a.tokenizer else []), check=True, env=env)
    # from nvidia-smi: CUDA in this process would hold a context's memory on the card the tries measure
    name, mib = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits",
                                "-i", "0"], capture_output=True, text=True, check=True).stdout.strip().rsplit(",", 1)
    card_gib = float(mib) / 1024
    a.host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    result = {"device": name.strip(), "card_gib": round(card_gib, 2), "host_gib": round(a.host_gib, 1),
              "quick": a.quick,
              "model": "Llama-3.1-8B shape, random weights, llama3 RoPE scaling", "batch": 1,
              "plan_max_seq": plan_max(folder, card_gib), "rows": {}}
    rows = a.rows.split(",")
    for row in rows:
        result["rows"][row] = {"lengths": []}
    for seq in lengths:   # each length for every row before the next length: the comparison first
        for row in rows:
            left = deadline - time.time()
            if left < 30:
                r = {"seq": seq, "status": "skipped", "why": "budget"}
            else:
                r = attempt(row, folder, seq, a.warmup, 1, min(a.timeout, left), env)
                print(json.dumps({k: v for k, v in r.items() if k != "tail"}), file=sys.stderr, flush=True)
            result["rows"][row]["lengths"].append(r)
    result["also"] = []
    for spec in (a.also if a.also is not None else "ours-qlora-nochunk:32768" if a.quick else "").split(","):
        if spec:   # single rows (ROW:LENGTH), e.g. the unchunked MLP against the rows above
            row, seq = spec.rsplit(":", 1)
            left = deadline - time.time()
            r = attempt(row, folder, int(seq), a.warmup, 1, min(a.timeout, left), env) if left > 60 else \
                {"row": row, "seq": int(seq), "status": "skipped", "why": "budget"}
            print(json.dumps({k: v for k, v in r.items() if k != "tail"}), file=sys.stderr, flush=True)
            result["also"].append(r)
    for row in rows:   # then the bisections, loraforge's first
        runs = result["rows"][row]["lengths"]
        ok = [r for r in runs if r["status"] == "ok"]
        failed = [r["seq"] for r in runs if r["status"] == "oom"]
        result["rows"][row]["longest"] = bisect(row, folder, env, ok, failed, card_gib, a, deadline)
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "long_context.json").write_text(text)


if __name__ == "__main__":
    main()
