"""Which grammar engine should structured decoding use? Per-token mask time on the embedded model's tokenizer.

    python bench/constrained_overhead.py --out bench/results/constrained_overhead.json

For each engine that imports (llguidance, xgrammar, outlines-core) and two structures, BANKING77's 77 intent
labels and the SNIPS slot answers' JSON Schema (src/loraforge/datasets/snips2017/schema.json), it compiles the
grammar once (timed), then walks every reference answer token by token as decoding would: compute the
permitted-token bitmask (timed: the per-token overhead a decoder pays), then advance by the reference token
(timed); three passes, the fastest kept, since other work on a shared machine only ever adds time.
Answers are BANKING77's 77 labels and the 700 SNIPS test answers, tokenized as the model would write
them, each followed by the end-of-turn token. Every engine gets the same tokenizer (SmolLM2-135M-Instruct,
49,152 tokens), the same compact JSON layout (", " and ": ", no free whitespace) and the same single CPU
thread (outlines-core's JSON regex has no layout option: it gets an optional space between items, a superset);
the check that each permitted every reference token is part of the output. Prints one JSON object.

Install (Python 3.11, torch 2.13 CPU): all three have wheels on PyPI. llguidance (abi3 wheel) and
outlines-core depend on nothing; xgrammar 0.2.9 requires triton (a 286 MB wheel) and apache-tvm-ffi, so it
was installed here with `pip install --no-deps xgrammar apache-tvm-ffi` (its CPU path does not import triton).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _output import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
REPEATS = 3           # passes over the answers; the fastest is kept (a shared machine is noisy)


def answers():
    import csv

    ds = ROOT / "src/loraforge/datasets"
    labels = json.loads((ds / "banking77/categories.json").read_text())
    with (ds / "banking77/test.csv").open(encoding="utf-8") as f:
        assert {r["category"] for r in csv.DictReader(f)} <= set(labels)
    schema = json.loads((ds / "snips2017/schema.json").read_text())
    rows = [json.loads(x) for x in (ds / "snips2017/test.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"labels": (labels, labels), "snips_json": (schema, [r["messages"][-1]["content"] for r in rows])}


def stats_us(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"mean_us": round(1e6 * statistics.fmean(xs), 2), "p50_us": round(1e6 * xs[len(xs) // 2], 2),
            "p99_us": round(1e6 * xs[int(len(xs) * 0.99)], 2), "max_us": round(1e6 * xs[-1], 2)}


def bit(words, token: int) -> bool:
    return bool((int(words[token // 32]) >> (token % 32)) & 1)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, stops):
        from loraforge.eval.structured import ll_tokenizer

        self.lt = ll_tokenizer(tok, stops)

    def compile(self, kind, spec):
        from loraforge.eval.structured import Structure, grammar_text

        import llguidance

        text = grammar_text(Structure(labels=tuple(spec)) if kind == "labels" else Structure(schema=spec))
        return llguidance.LLMatcher(self.lt, text, log_level=0)   # the prototype each answer copies

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, words):
        m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def advance(self, m, t):
        return m.consume_token(t)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, stops):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=list(stops))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, kind, spec):
        if kind == "labels":
            return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in spec))
        return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, words):
        m.fill_next_token_bitmask(words.view(1, -1), 0)

    def advance(self, m, t):
        return m.accept_token(t)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, stops):
        import outlines_core as oc

        self.oc, self.stops = oc, stops
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        special = set(tok.all_special_ids)
        vocab: dict[bytes, list[int]] = {}
        for token, i in tok.get_vocab().items():
            if i in special:
                continue
            vocab.setdefault(bytes(byte_of[c] for c in token), []).append(i)
        self.vocab = oc.Vocabulary(stops[0], vocab)

    def compile(self, kind, spec):
        import re

        if kind == "labels":
            regex = "(" + "|".join(re.escape(x) for x in spec) + ")"
        else:
            # its JSON regex has no layout option: an optional space between any two items is the nearest
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec), whitespace_pattern=r"[ ]?")
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, m, words):
        m.write_mask_into(words.data_ptr(), words.numel(), 4)

    def advance(self, m, t):
        if t in self.stops:           # the mask already said the answer may end here
            return True
        m.advance(t)
        return True


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (byte -> the character its tokens spell it with)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def run_engine(cls, tok, stops, tasks) -> dict:
    import torch

    try:
        t0 = time.perf_counter()
        eng = cls(tok, stops)
        setup = time.perf_counter() - t0
    except ImportError as e:
        return {"installed": False, "error": str(e)}
    out = {"installed": True, "version": md.version(cls.name), "tokenizer_setup_s": round(setup, 3)}
    for task, (spec, refs) in tasks.items():
        t0 = time.perf_counter()
        compiled = eng.compile(task, spec)
        compile_s = time.perf_counter() - t0
        words = torch.zeros((len(tok) + 31) // 32, dtype=torch.int32)
        passes = [walk(eng, compiled, tok, stops, refs, words) for _ in range(REPEATS)]
        best = min(passes, key=lambda p: sum(p[0]) + sum(p[1]))
        masks, advances, starts, rejected, examples = best
        per_token = [a + b for a, b in zip(masks, advances)]
        out[task] = {"compile_s": round(compile_s, 3), "answers": len(refs), "tokens": len(masks),
                     "reference_tokens_rejected": rejected, "rejected_examples": examples[:3],
                     "start": stats_us(starts), "mask": stats_us(masks), "advance": stats_us(advances),
                     "mask_plus_advance_mean_us": stats_us(per_token)["mean_us"],
                     "pass_means_us": [round(1e6 * (sum(p[0]) + sum(p[1])) / len(p[0]), 2) for p in passes]}
    return out


def walk(eng, compiled, tok, stops, refs, words):
    """One pass over the answers: (mask times, advance times, start times, rejected, examples)."""
    masks, advances, starts, rejected, examples = [], [], [], 0, []
    for ref in refs:
        t0 = time.perf_counter()
        m = eng.matcher(compiled)
        starts.append(time.perf_counter() - t0)
        for t in tok(ref, add_special_tokens=False)["input_ids"] + [stops[0]]:
            t0 = time.perf_counter()
            eng.fill(m, words)
            t1 = time.perf_counter()
            masks.append(t1 - t0)
            if not bit(words, t):
                rejected += 1
                advances.append(0.0)
                examples.append(f"{ref!r}: token {t} {tok.convert_ids_to_tokens(t)!r} not permitted")
                break
            t1 = time.perf_counter()
            ok = eng.advance(m, t)
            advances.append(time.perf_counter() - t1)
            if not ok:
                rejected += 1
                examples.append(f"{ref!r}: token {t} {tok.convert_ids_to_tokens(t)!r} refused")
                break
    return masks, advances, starts, rejected, examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from loraforge.eval.generate import stop_token_ids
    from loraforge.model.load import load_tokenizer, resolve_base

    tok = load_tokenizer(resolve_base("smollm2-135m-instruct"))
    stops = stop_token_ids(tok)
    stops = sorted(stops, key=lambda i: i != tok.convert_tokens_to_ids("<|im_end|>"))  # end-of-turn first
    tasks = answers()
    result = {"bench": "constrained_overhead", "tokenizer": "SmolLM2-135M-Instruct", "vocab": len(tok),
              "command": "python bench/constrained_overhead.py --out bench/results/constrained_overhead.json",
              "device": f"CPU ({platform.processor() or platform.machine()}, 1 thread)",
              "install": {"llguidance": "no dependencies", "outlines-core": "no dependencies",
                          "xgrammar": "requires triton (286 MB wheel) + apache-tvm-ffi; benched with --no-deps"},
              "engines": {c.name: run_engine(c, tok, stops, tasks) for c in (LLGuidance, XGrammar, OutlinesCore)}}
    ok = {n: e for n, e in result["engines"].items() if e.get("installed")}
    result["summary_us_per_token"] = {n: {t: e[t]["mask_plus_advance_mean_us"] for t in tasks} for n, e in ok.items()}
    result["summary_compile_s"] = {n: {t: e[t]["compile_s"] for t in tasks} for n, e in ok.items()}
    result["fastest_per_token"] = {t: min(ok, key=lambda n: ok[n][t]["mask_plus_advance_mean_us"]) for t in tasks}
    emit(result, args.out)


if __name__ == "__main__":
    main()
