"""Speed and memory of the data-curation toolkit on synthetic data it generates itself; prints JSON.

    python bench/data_speed.py                      # 1,000,000 records for the pipeline, 100,000 for the rest
    python bench/data_speed.py --records 200000 --small 20000 --workdir /tmp/lf-bench

Targets (issue "data curation toolkit", a 2-core machine):
  pipeline     validate + exact dedup + split of 1,000,000 messages records in one streaming pass
               (`loraforge data split --dedup --near-threshold 0`, worker processes on the CPUs):
               >= 50,000 records/s, peak memory (main + workers) <= 2 GiB
  near_dup     MinHash LSH near-duplicate search over 100,000 records: <= 60 s
  token_stats  token statistics (`data inspect`) over 100,000 records: <= 60 s
Also timed, for reference: the separate commands validate, dedup --method exact and split, each a
full pass of its own. Every stage runs in a fresh child process, so its peak RSS is its own.
This is a measurement, not a test: nothing fails when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("card account transfer money refund fee limit top up cash atm exchange rate payment pending declined "
         "arrived blocked pin phone app verify identity statement charge balance deposit cheque virtual "
         "contactless abroad currency salary why how when is my the a not yet still please help can I do").split()
SYSTEM = "You are a helpful banking assistant. Reply with the intent label only."


def generate(path: Path, n: int, seed: int, near_share: float = 0.0) -> dict:
    """A messages JSONL of n records: ~3% exact duplicates, ~0.5% broken lines, `near_share` edited copies."""
    rng = random.Random(seed)
    dup = broken = near = 0
    recent: list[tuple[str, str]] = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            r = rng.random()
            if recent and r < 0.03:
                (q, label), dup = rng.choice(recent), dup + 1
            elif recent and r < 0.03 + near_share:
                q, label = rng.choice(recent)
                words = q.split()
                words[rng.randrange(len(words))] = rng.choice(WORDS)  # one word changed
                q, near = " ".join(words), near + 1
            else:
                q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + f" {i}?"
                label = f"intent_{rng.randrange(77)}"
            if len(recent) < 1000:  # a ring of the last 1000 records, to copy from
                recent.append((q, label))
            else:
                recent[i % 1000] = (q, label)
            if rng.random() < 0.005:
                f.write('{"messages": [{"role": "user", "content": "' + q + '"}\n')
                broken += 1
                continue
            f.write('{"messages":[{"role":"system","content":"' + SYSTEM + '"},{"role":"user","content":"' + q +
                    '"},{"role":"assistant","content":"' + label + '"}],"label":"' + label + '"}\n')
    return {"records": n, "exact_duplicates": dup, "edited_copies": near, "broken_lines": broken,
            "bytes": path.stat().st_size}


def _tokenizer():
    """The embedded SmolLM2 tokenizer when it is installed, else a byte-level BPE trained here with ChatML."""
    try:
        from loraforge.config import EMBEDDED_MODEL
        from loraforge.model.load import load_tokenizer, resolve_base

        return load_tokenizer(resolve_base(EMBEDDED_MODEL)), EMBEDDED_MODEL
    except Exception:  # no embedded model here: a local tokenizer measures the same code path
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(
            vocab_size=2000, special_tokens=["<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
        fast.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                              "'<|im_end|>\n' }}{% endfor %}")
        return fast, "local byte-level BPE (ChatML)"


def stage(name: str, src: Path, work: Path) -> dict:
    """Run one stage in this process and describe it."""
    from loraforge.data.dedup import dedup_file
    from loraforge.data.scan import default_workers
    from loraforge.data.split import split_file
    from loraforge.data.validate import validate_file

    start = time.perf_counter()
    if name == "pipeline":
        r = split_file(src, work / "train.jsonl", work / "validation.jsonl", near_threshold=None, dedup=True)
        out = {"records": r.input.records, "valid": r.input.valid, "rejected": r.input.rejected,
               "duplicates_removed": r.removed, "train": r.train, "validation": r.validation,
               "stratified": r.stratified, "leaks_exact": r.leaks_exact}
    elif name == "validate":
        r = validate_file(src, out=work / "clean.jsonl", rejects=work / "rejects.jsonl")
        out = {"records": r.records, "valid": r.valid, "rejected": r.rejected}
    elif name == "dedup_exact":
        r = dedup_file(src, work / "dedup.jsonl", methods=("exact",))
        out = {"records": r.input.records, "kept": r.kept, "removed": r.removed}
    elif name == "split":
        r = split_file(src, work / "train.jsonl", work / "validation.jsonl", near_threshold=None)
        out = {"records": r.input.records, "train": r.train, "validation": r.validation, "grouped": r.grouped}
    elif name == "near_dup":
        r = dedup_file(src, work / "near.jsonl", methods=("near",), threshold=0.8)
        out = {"records": r.input.records, "kept": r.kept, "removed": r.removed, "clusters": len(r.clusters)}
    elif name == "token_stats":
        from loraforge.data.stats import inspect_file

        tok, which = _tokenizer()
        start = time.perf_counter()  # loading the tokenizer is not the measured work
        s = inspect_file(src, tok, max_seq_length=128)
        out = {"records": s.input.records, "tokenizer": which, "p50": s.percentiles["p50"],
               "p99": s.percentiles["p99"], "truncated_at_128": s.truncated,
               "suggested_max_seq_length": s.suggested_max_seq_length}
    else:
        raise SystemExit(f"unknown stage {name}")
    seconds = time.perf_counter() - start
    main_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest worker process
    workers = default_workers() if name in ("pipeline", "split") else 0
    out.update(seconds=round(seconds, 2), records_per_s=round(out["records"] / seconds),
               peak_rss_mib=round(main_mib + workers * worker_mib),  # main + every worker at its largest
               main_rss_mib=round(main_mib), worker_rss_mib=round(worker_mib), workers=workers)
    return out


def child(name: str, src: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--src", str(src), "--workdir", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records for the pipeline stages")
    ap.add_argument("--small", type=int, default=100_000, help="records for near_dup and token_stats")
    ap.add_argument("--workdir", type=Path, default=None, help="where the data goes (default: a temp dir)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.src, args.workdir)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        big, small = work / "big.jsonl", work / "small.jsonl"
        t = time.perf_counter()
        data = {"big": generate(big, args.records, 0), "small": generate(small, args.small, 1, near_share=0.05)}
        data["generate_seconds"] = round(time.perf_counter() - t, 1)
        results = {"command": "python " + " ".join(sys.argv),
                   "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 1) for x in os.getloadavg()],
                               "python": sys.version.split()[0]}, "data": data}
        for name in ("pipeline", "validate", "dedup_exact", "split"):
            results[name] = child(name, big, work)
        for name in ("near_dup", "token_stats"):
            results[name] = child(name, small, work)
        p, nd, ts = results["pipeline"], results["near_dup"], results["token_stats"]
        results["targets"] = {
            "pipeline >= 50000 records/s": p.get("records_per_s", 0) >= 50_000,
            "pipeline peak <= 2048 MiB": p.get("peak_rss_mib", 1e9) <= 2048,
            "near_dup <= 60 s": nd.get("seconds", 1e9) <= 60,
            "token_stats <= 60 s": ts.get("seconds", 1e9) <= 60,
        }
        results["machine"]["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
