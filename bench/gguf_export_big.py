"""Time the GGUF q4_k_m export of a Llama-3.1-8B-shaped model with random bf16 weights; prints JSON.

Target (issue 5): GGUF q4_k_m export of an 8B model's weights in under 10 minutes on a 16-core machine.

Device command (16 cores, Python 3.12, no internet). Carry .gpu/llama: site.tar.xz holds llama-cpp-python
0.3.36 (CPU, portable AVX2 build, see .gpu/llama/README.md) + gguf + pydantic for Python 3.12; tok/ holds
the SmolLM2 tokenizer. Files go to /tmp/lf/work (about 22 GB at the peak), only the JSON to $OUT:
    mkdir -p /tmp/lf && tar -xJf .gpu/llama/site.tar.xz -C /tmp/lf && \
    PYTHONPATH=/tmp/lf/site:$PWD/src python bench/gguf_export_big.py --tokenizer .gpu/llama/tok \
        --work /tmp/lf/work --threads 16 --out $OUT/gguf_export_8b.json
(run with timeout_s=600; the JSON is rewritten after every stage, so a run cut off still reports the
stages it finished. If the whole does not fit in one call, split it: the same command with --build-only
first (writes and keeps the random model, untimed), then the command as above, which reuses it.)

Smoke test on a small machine (same code, a toy shape; the tokenizer defaults to .gpu/llama/tok):
    python bench/gguf_export_big.py --layers 2 --hidden 512 --vocab 0 --threads 2 --out /tmp/gguf_small.json

What it does:
  1. build    writes a model folder (config.json of the Llama 3.1 8B shape: vocab 128256, hidden 4096,
              32 layers, 32 heads / 8 KV heads, intermediate 14336, llama3 rope scaling; 8.03e9 params)
              with random bf16 weights, one safetensors shard per layer, so at most one layer is in memory;
              values are windows of one pool of normal(0, 0.02) draws (RandomPool). Not part of the export.
              Tokenizer: tokenizer.json + tokenizer_config.json (+ chat_template.jinja) of --tokenizer.
              Its 49152 tokens are fewer than the 8B embedding's 128256 rows: the model keeps the real 8B
              shape and the GGUF token list is padded to the embedding rows with UNUSED `[PAD<i>]` tokens by
              export.vocab.gguf_vocab (what the export does for any model whose embedding is larger than
              its tokenizer, e.g. Qwen2), so token metadata and embedding rows agree (checked: llama.cpp
              loads the file with n_vocab 128256). --vocab 0 makes the vocab the tokenizer's size instead.
  2. load     loraforge.model.load.load_base(folder, dtype=--dtype): float32 by default, as `export gguf`
              holds the merged model (--dtype bfloat16 halves the memory).
  3. imatrix  only with --imatrix: export.imatrix on the packaged general prompts (the CLI's default
              calibration, on CPU here).
  4. f16      export.gguf.write_model_gguf(model, tokenizer, ..., "f16"): the staging file of q4_k_m.
  5. q4_k_m   export.gguf.quantize_gguf(f16, q4, "q4_k_m", threads=--threads): llama.cpp's quantizer.
  6. check    the q4_k_m file read back with gguf.GGUFReader (file type, tensor types, token count) and
              loaded by llama.cpp (llama-cpp-python), which evaluates a prompt; its last logits are
              compared with the transformers model's (correlation; computed right after loading).
These are the functions `loraforge export gguf --quant q4_k_m` calls (pipeline.write_quantised), minus
the LoRA merge. seconds_total = load + imatrix (if run) + f16 + q4_k_m. Files go to --work (removed at
the end unless --keep or --build-only), never to --out, which gets only the JSON.
This is a measurement, not a test: nothing fails when the target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
TARGET_S = 600
PROMPT = "The capital of France is Paris, and the capital of Italy is"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the JSON result here too")
    p.add_argument("--work", type=Path, help="folder for the model and GGUF files (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep --work's files")
    p.add_argument("--build-only", action="store_true", help="only write the model folder into --work (kept); "
                   "a later call with the same shape and --work reuses it")
    p.add_argument("--tokenizer", help="folder with tokenizer.json + tokenizer_config.json "
                                       "(default: .gpu/llama/tok, else the embedded model)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, help="default: 3.5 x hidden (14336 for 4096)")
    p.add_argument("--heads", type=int, help="default: hidden / 128")
    p.add_argument("--kv-heads", type=int, help="default: min(8, heads)")
    p.add_argument("--vocab", type=int, default=128256, help="embedding rows; 0 = the tokenizer's size")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model dtype when loaded")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp quantizer threads")
    p.add_argument("--imatrix", action="store_true", help="also time the importance matrix (CLI default)")
    p.add_argument("--no-check", action="store_true", help="skip loading the result with llama.cpp")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def tokenizer_folder(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if (REPO / ".gpu" / "llama" / "tok" / "tokenizer.json").is_file():
        return REPO / ".gpu" / "llama" / "tok"
    from loraforge.config import EMBEDDED_MODEL
    from loraforge.model.load import resolve_base

    return Path(resolve_base(EMBEDDED_MODEL))


def shape_of(args, tok_vocab: int) -> dict:
    heads = args.heads or max(1, args.hidden // 128)
    inter = args.intermediate or int(round(args.hidden * 3.5 / 256)) * 256
    return {"layers": args.layers, "hidden": args.hidden, "intermediate": inter, "heads": heads,
            "kv_heads": args.kv_heads or min(8, heads), "head_dim": args.hidden // heads,
            "vocab": args.vocab or tok_vocab, "tokenizer_vocab": tok_vocab}


def n_params(s: dict) -> int:
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return s["layers"] * (2 * h * q + 2 * h * kv + 3 * h * s["intermediate"] + 2 * h) + 2 * s["vocab"] * h + h


def llama31_config(s: dict, bos: int | None, eos: int | None) -> dict:
    """config.json of Llama-3.1-8B with the shape `s` (rope scaling, theta and norms as the real one)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s["vocab"],
            "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"], "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "bos_token_id": bos, "eos_token_id": eos, "initializer_range": 0.02,
            "torch_dtype": "bfloat16", "use_cache": True}


class RandomPool:
    """Normal(0, 0.02) bf16 values drawn once (2**26 + 17 of them); each tensor is a window of the pool at a
    random offset, wrapping around. Drawing 8e9 values one by one takes many minutes on one core; copying
    windows runs at memory speed, and the values are as random as quantisation timing needs."""

    def __init__(self, seed: int, size: int = 2**26 + 17):
        import torch

        self.gen = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(size, generator=self.gen) * 0.02).to(torch.bfloat16)

    def tensor(self, *shape):
        import torch

        n, size = math.prod(shape), self.pool.numel()
        out = torch.empty(n, dtype=torch.bfloat16)
        start = int(torch.randint(size, (1,), generator=self.gen))
        done = 0
        while done < n:
            take = min(n - done, size - start)
            out[done:done + take] = self.pool[start:start + take]
            done, start = done + take, 0
        return out.view(*shape)


def layer_tensors(s: dict, i: int, rnd: RandomPool) -> dict:
    import torch

    h, kv, q, inter = s["hidden"], s["kv_heads"] * s["head_dim"], s["heads"] * s["head_dim"], s["intermediate"]
    pre = f"model.layers.{i}."
    return {pre + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            pre + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            pre + "self_attn.q_proj.weight": rnd.tensor(q, h), pre + "self_attn.k_proj.weight": rnd.tensor(kv, h),
            pre + "self_attn.v_proj.weight": rnd.tensor(kv, h), pre + "self_attn.o_proj.weight": rnd.tensor(h, q),
            pre + "mlp.gate_proj.weight": rnd.tensor(inter, h), pre + "mlp.up_proj.weight": rnd.tensor(inter, h),
            pre + "mlp.down_proj.weight": rnd.tensor(h, inter)}


def build_model(folder: Path, s: dict, tok_dir: Path, seed: int) -> int:
    """Write the model folder shard by shard (one layer in memory at a time); returns the parameter count.
    BUILT.json, written last, marks a complete folder that a later call with the same shape reuses."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, folder / name)
    tok = AutoTokenizer.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(llama31_config(s, tok.bos_token_id, tok.eos_token_id), indent=1))
    rnd = RandomPool(seed)
    n_shards = s["layers"] + 2
    weight_map, total, params = {}, 0, 0

    def save(i: int, tensors: dict):
        nonlocal total, params
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
            params += t.numel()

    save(0, {"model.embed_tokens.weight": rnd.tensor(s["vocab"], s["hidden"])})
    for i in range(s["layers"]):
        save(i + 1, layer_tensors(s, i, rnd))
    save(n_shards - 1, {"model.norm.weight": torch.ones(s["hidden"], dtype=torch.bfloat16),
                        "lm_head.weight": rnd.tensor(s["vocab"], s["hidden"])})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "BUILT.json").write_text(json.dumps({"shape": s, "seed": seed, "params": params}))
    return params


def built(folder: Path, s: dict, seed: int) -> int | None:
    """The parameter count of a complete earlier build of this shape and seed in `folder`, else None."""
    try:
        info = json.loads((folder / "BUILT.json").read_text())
    except (OSError, ValueError):
        return None
    ok = info.get("shape") == s and info.get("seed") == seed and (folder / "model.safetensors.index.json").is_file()
    return info["params"] if ok else None


def read_back(path: Path) -> dict:
    """File type, tensor type counts and token count of a GGUF file, from its header."""
    import gguf

    r = gguf.GGUFReader(str(path))
    field = r.get_field("general.file_type")
    tokens = r.get_field("tokenizer.ggml.tokens")
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"file_type": int(field.parts[field.data[0]][0]) if field else None,
            "tensors": len(r.tensors), "tensor_types": types,
            "tokens": len(tokens.data) if tokens else None}


def reference_logits(model, tokenizer) -> tuple[list[int], "np.ndarray"]:
    """Prompt ids and the transformers model's last-position logits, to compare llama.cpp's against."""
    import torch

    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return ids, logits.float().numpy()


def llama_cpp_check(path: Path, threads: int, ids: list[int], ref) -> dict:
    """Load the file with llama.cpp, evaluate the prompt ids and compare its last logits with transformers'
    (random weights make the logits small and flat, so this is a wiring check: correlation, not top-1)."""
    import numpy as np
    from llama_cpp import Llama

    from loraforge.export.gguf import captured_fds

    log: list[str] = []
    t = time.perf_counter()
    with captured_fds(log):
        llm = Llama(model_path=str(path), n_ctx=64, n_threads=threads, n_gpu_layers=0, logits_all=True,
                    verbose=False)
        llm.eval(ids)
        logits = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
        n_vocab = llm.n_vocab()
        llm.close()
    return {"seconds": round(time.perf_counter() - t, 2), "n_vocab": n_vocab, "prompt_tokens": len(ids),
            "logits_finite": bool(np.isfinite(logits).all()), "logits_std": round(float(logits.std()), 5),
            "ref_logits_std": round(float(ref.std()), 5),
            "corr_with_transformers": round(float(np.corrcoef(logits, ref)[0, 1]), 4),
            "top1_llama_cpp": int(logits.argmax()), "top1_transformers": int(ref.argmax())}


def record(res: dict, out: Path | None) -> None:
    """Write what is known so far to --out (a run cut off by a time limit still leaves its stages)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(out)


def timed(res: dict, key: str, out: Path | None, fn, *a, **kw):
    t = time.perf_counter()
    value = fn(*a, **kw)
    res[key] = round(time.perf_counter() - t, 2)
    record(res, out)
    return value


def main(argv=None) -> dict:
    args = parse_args(argv)
    from loraforge.export.gguf import quantize_gguf, require_llama_cpp, write_model_gguf
    from loraforge.model.load import load_base

    require_llama_cpp()                              # fail before minutes of work
    tok_dir = tokenizer_folder(args.tokenizer)
    if not (tok_dir / "tokenizer.json").is_file():
        sys.exit(f"no tokenizer.json in {tok_dir}")
    from transformers import AutoTokenizer

    tok_vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    s = shape_of(args, tok_vocab)
    if s["vocab"] < tok_vocab:
        sys.exit(f"--vocab {s['vocab']} is smaller than the tokenizer ({tok_vocab} tokens)")
    keep = args.keep or args.build_only
    work = args.work or Path(tempfile.mkdtemp(prefix="lf-gguf-big-"))
    work.mkdir(parents=True, exist_ok=True)
    folder, f16, q4 = work / "model", work / "model-f16.gguf", work / "model-q4_k_m.gguf"
    reused = built(folder, s, args.seed)
    if args.build_only:                              # new files at their peak, in 16-bit model sizes
        files = 0.0 if reused else 1.0
    else:                                            # (f16 GGUF + q4_k_m; the folder goes after loading)
        files = 2.3 if keep and not reused else 1.3
    need = 1.05 * files * 2 * n_params(s) / 2**30
    free = shutil.disk_usage(work).free / 2**30
    if free < need:
        sys.exit(f"{work} has {free:.1f} GiB free; this needs about {need:.0f} GiB: pass --work elsewhere")
    res: dict = {"shape": s, "threads": args.threads, "cpu_count": os.cpu_count(),
                 "cpus_usable": len(os.sched_getaffinity(0)), "dtype_loaded": args.dtype, "target_s": TARGET_S,
                 "work_free_gib": round(free, 1), "reused_build": bool(reused)}
    try:
        if reused:
            res["params"] = reused
        else:
            res["params"] = timed(res, "seconds_build", args.out, build_model, folder, s, tok_dir, args.seed)
        if args.build_only:
            print(json.dumps(res, indent=1))
            return res
        model, tokenizer, _ = timed(res, "seconds_load", args.out, load_base, str(folder), dtype=args.dtype,
                                    device="cpu")
        if not keep:                                 # the weights are in memory now: free the disk
            for f in folder.glob("*.safetensors"):
                f.unlink()
        ids, ref = reference_logits(model, tokenizer) if not args.no_check else (None, None)
        imatrix = None
        if args.imatrix:
            from loraforge.export.imatrix import calibration_texts, importance_matrix

            texts, _ = calibration_texts(tokenizer, {})
            imatrix = timed(res, "seconds_imatrix", args.out, importance_matrix, model, tokenizer, texts)
        timed(res, "seconds_f16", args.out, write_model_gguf, model, tokenizer, f16, "f16",
              name="random-llama-3.1-8b-shape")
        res["f16_bytes"] = f16.stat().st_size
        del model                                    # the CLI keeps it until the end; memory is not timed
        timed(res, "seconds_q4_k_m", args.out, quantize_gguf, f16, q4, "q4_k_m", threads=args.threads,
              imatrix=imatrix)
        res["gguf_bytes"] = q4.stat().st_size
        res["seconds_total"] = round(sum(res.get(k, 0) for k in ("seconds_load", "seconds_imatrix",
                                                                 "seconds_f16", "seconds_q4_k_m")), 2)
        res["met_target"] = res["seconds_total"] < TARGET_S
        res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        f16.unlink()
        res["q4_k_m_file"] = read_back(q4)
        record(res, args.out)
        if not args.no_check:
            res["llama_cpp_check"] = llama_cpp_check(q4, args.threads, ids, ref)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    record(res, args.out)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
