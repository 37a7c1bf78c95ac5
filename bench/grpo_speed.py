"""GRPO's speed and memory, what users run, against Unsloth + TRL's GRPOTrainer in one device call (issue 24).

    python bench/grpo_speed.py --tokenizer TOKDIR --out $OUT/grpo.json [--tools loraforge,unsloth-trl] [--steps 2]
    python bench/grpo_speed.py --tokenizer TOKDIR --shape tiny --tools loraforge --prompt-tokens 32 \
        --max-completion 16 --cache /tmp/lf-grpo-cpu        # a CPU smoke test of loraforge's side

`loraforge train` with `objective: grpo` against Unsloth 2026.10 + TRL 1.15's GRPOTrainer on its default
generation path (`model.generate` under Unsloth's patches: `fast_inference=False`, no vLLM), each tool in its
own process, on the same settings: a Llama-3.1-8B shape QLoRA (random weights, SmolLM2's tokenizer and chat
template, built by bench/train_speed.py; --shape tiny: a 2-layer Llama built here, unquantised, for CPU),
r = alpha = 16 on all linear layers, dropout 0, lr 5e-6, KL off (beta 0), G = 8 completions per prompt of up
to --max-completion tokens (temperature 1, top-p 1, no top-k), one prompt a step (8 completions; TRL: a batch
of 8 = one group), --steps steps on --steps prompts of ~--prompt-tokens random words (made as
bench/preference_speed.py's). The reward is `reward` below, one plain Python function for both (loraforge
loads it as `grpo_speed.py:reward`, TRL through a list adapter): the stripped completion's length in
characters over 4,096, at most 1. Random weights rarely sample the stop token, so each tool generates about
8 x --max-completion tokens a step; `completion_tokens` (with the stop token where one came) shows it.
Checkpointing offloaded (loraforge `offload`, Unsloth's "unsloth"); optimizers: loraforge's default, Unsloth's
notebooks' adamw_8bit. `--tools trl` adds plain TRL + PEFT; `--add-rows` joins an earlier call's rows.

Per tool: seconds per step (the mean after the first step when there are two or more, else over all),
each step's seconds (loraforge: metrics.jsonl's elapsed_s; TRL: a callback's step ends, from
trainer.train()'s start), train seconds (summary.json's train_seconds; trainer.train()), completion tokens
(loraforge: tokens_seen less 8 x the templated prompts' tokens; TRL: the completion ids its reward call
gets) and peak reserved / allocated GPU memory (loraforge: its process's peak in summary.json; the peers:
torch's peak from trainer.train()'s start). Ratios are loraforge / peer (#24: memory <= 0.8, time <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _output import emit  # noqa: E402
from _peers import (keep_rows, loraforge_train, peer_model, print_result, run_tool, timed_train,  # noqa: E402
                    tiny_llama)
from preference_speed import _text  # noqa: E402

TOOLS = ["loraforge", "unsloth-trl", "trl"]
R, LR, SEED, G, TEMPERATURE = 16, 5e-6, 3407, 8, 1.0
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False)


def reward(prompt, completion: str, **row) -> float:
    """The benchmark's reward, the same for every tool: longer completions score more (capped at 1)."""
    return min(len(completion.strip()) / 4096, 1.0)


def trl_reward(counted: list):
    """`reward` as TRL calls a reward function (lists in, one value per completion out; a completion is a list
    of messages for conversational prompts), each completion's token count appended to `counted`."""
    def length_reward(prompts, completions, completion_ids=None, **row):
        counted.extend(len(c) for c in completion_ids or [])
        return [reward(None, c[-1]["content"] if isinstance(c, list) else c) for c in completions]
    return length_reward


def make_prompts(tokenizer_dir: str, n: int, tokens: int, out: Path) -> Path:
    """n conversational prompts {prompt: [user turn of ~`tokens` random words]} as JSONL (both tools' format)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = sorted(w[1:] for w in tok.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 3)
    rng = random.Random(SEED)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": _text(tok, words, rng, tokens)}]}) + "\n")
    return out


def prompt_lengths(model_dir: str, prompts: Path) -> list[int]:
    """Each prompt's tokens as the model sees it (chat template and generation prompt, as loraforge renders it)."""
    from transformers import AutoTokenizer

    from loraforge.data.templates import prompt_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x)["prompt"] for x in prompts.read_text().splitlines() if x.strip()]
    return [len(tok(prompt_text(tok, r), add_special_tokens=False)["input_ids"]) for r in rows]


def model_folder(shape: str, tokenizer_dir: str, cache: Path) -> str:
    """bench/train_e2e.py's model_dir (a train_speed.py shape, random weights, built once on the GPU), or for
    `tiny` a 2-layer Llama with the tokenizer's vocabulary built here on the CPU."""
    if shape != "tiny":
        from train_e2e import model_dir

        return model_dir(shape, tokenizer_dir, cache)
    return tiny_llama(tokenizer_dir, cache / "model-tiny", TINY)


def step_seconds(ends: list[float]) -> dict:
    """Each step's seconds from the steps' end times (seconds since the loop began); the mean per step after
    the first when there are two or more (the first pays one-off compilation and allocation)."""
    each = [round(b - a, 3) for a, b in zip([0.0, *ends], ends)]
    timed = each[1:] if len(each) >= 2 else each
    return {"seconds_per_step": round(sum(timed) / max(len(timed), 1), 3), "step_seconds": each}


def loraforge_config(spec: dict, work: Path, cuda: bool) -> dict:
    return {"base_model": spec["model_dir"], "output_dir": str(work / "run"), "seed": SEED, "objective": "grpo",
            "model": {"quantization": "nf4" if cuda else "none", "gradient_checkpointing": "offload" if cuda else True},
            "data": {"train": spec["prompts"], "validation_split": 0.0, "max_seq_length": spec["max_seq_length"]},
            "grpo": {"rewards": [f"{Path(__file__).resolve()}:reward"], "group_size": G,
                     "max_new_tokens": spec["max_completion"], "temperature": TEMPERATURE, "top_p": 1.0,
                     "kl_beta": 0.0},
            "lora": {"r": R, "alpha": R, "dropout": 0.0},
            "train": {"epochs": 1, "max_steps": spec["steps"], "learning_rate": LR, "batch_size": 1,
                      "grad_accum": 1, "eval_every": 100000, "save_every": 100000}}


def run_loraforge(spec: dict, work: Path) -> dict:
    import torch

    s, wall, log = loraforge_train(loraforge_config(spec, work, torch.cuda.is_available()), work)
    if s is None:
        return {"error": log[-3000:]}
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ends = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    completion = s["tokens_seen"] - G * sum(spec["prompt_tokens"][:len(ends)])
    return {**step_seconds(ends), "steps": len(ends), "train_seconds": s["train_seconds"],
            "wall_seconds": round(wall, 1), "completion_tokens": completion,
            "peak_reserved_gib": s["peak_reserved_gib"], "peak_allocated_gib": s.get("peak_allocated_gib"),
            "final_train_loss": s.get("final_train_loss")}


def run_peer(tool: str, spec: dict, work: Path) -> dict:
    """Unsloth + TRL's GRPOTrainer (as its notebooks, fast_inference off) or plain TRL + PEFT; in this process."""
    import torch

    cuda = torch.cuda.is_available()   # (CPU: a smoke test of the set-up only)
    t_start = time.time()
    model, tok, kw = peer_model(tool, spec["model_dir"], spec["max_seq_length"], qlora=True, r=R, dropout=0.0,
                                seed=SEED)
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    counted, ends = [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.time())

    args = GRPOConfig(output_dir=str(work / "out"), per_device_train_batch_size=G, gradient_accumulation_steps=1,
                      num_generations=G, max_completion_length=spec["max_completion"], temperature=TEMPERATURE,
                      top_p=1.0, beta=0.0, use_vllm=False, learning_rate=LR, max_steps=spec["steps"],
                      optim="adamw_8bit" if tool == "unsloth-trl" else "adamw_torch_fused", bf16=cuda,
                      logging_steps=1, save_strategy="no", report_to="none", seed=SEED)
    data = load_dataset("json", data_files={"train": spec["prompts"]})["train"]
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward(counted)], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[StepClock()], **kw)
    class StartClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            starts.append(time.time())

    starts: list[float] = []
    trainer.add_callback(StartClock())
    out, secs, peaks = timed_train(trainer)
    t0 = starts[0] if starts else ends[0]
    return {**step_seconds([t - t0 for t in ends]), "steps": len(ends), "train_seconds": round(secs, 2),
            "wall_seconds": round(time.time() - t_start, 1), "completion_tokens": sum(counted), **peaks,
            "final_train_loss": out.training_loss, "fast_inference": False, "use_vllm": args.use_vllm}


def ratios(rows: list[dict]) -> dict:
    """loraforge / peer for time per step and peak memory, with #24's targets."""
    ok = {r["tool"]: r for r in rows if "error" not in r}
    ours, out = ok.get("loraforge"), {}
    for tool, r in ok.items():
        if tool == "loraforge" or not ours:
            continue
        ratio = {k: round(ours[k] / r[k], 3) if ours.get(k) and r.get(k) else None
                 for k in ("seconds_per_step", "peak_reserved_gib", "peak_allocated_gib", "completion_tokens")}
        ratio["meets_24"] = None if None in (ratio["seconds_per_step"], ratio["peak_reserved_gib"]) else \
            ratio["seconds_per_step"] <= 1.0 and ratio["peak_reserved_gib"] <= 0.8
        out[tool] = ratio
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", nargs="?", default="run", choices=["run", "child"])
    ap.add_argument("--tokenizer", help="SmolLM2's HF folder (tokenizer and chat template)")
    ap.add_argument("--tools", default="loraforge,unsloth-trl", help=f"of {','.join(TOOLS)}")
    ap.add_argument("--shape", default="8b", help="a bench/train_speed.py shape, or tiny (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=2, help="steps = prompts (one prompt, G completions a step)")
    ap.add_argument("--max-completion", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--timeout", type=int, default=420, help="seconds per peer")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lf-grpo"))
    ap.add_argument("--spec", type=Path, help="(child) the spec file")
    ap.add_argument("--tool", help="(child) the peer")
    ap.add_argument("--add-rows", type=Path, help="an earlier call's JSON on the same settings: its rows join "
                                                  "this call's (the other tool's, where one call cannot hold both)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.cmd == "child":
        print_result(run_peer(a.tool, json.loads(a.spec.read_text()), a.spec.parent))
        return
    import torch

    folder = model_folder(a.shape, a.tokenizer, a.cache)
    prompts = make_prompts(a.tokenizer, a.steps, a.prompt_tokens, a.cache / "prompts.jsonl")
    lengths = prompt_lengths(folder, prompts)
    spec = {"model_dir": folder, "prompts": str(prompts), "prompt_tokens": lengths, "steps": a.steps,
            "max_completion": a.max_completion, "max_seq_length": max(lengths) + a.max_completion + 8}
    head = {"command": "python " + " ".join(sys.argv),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "shape": a.shape,
            "group_size": G, "steps": a.steps, "max_completion_tokens": a.max_completion, "prompt_tokens": lengths,
            "peers": "Unsloth + TRL GRPOTrainer, fast_inference=False (no vLLM): TRL's model.generate path"}
    rows = json.loads(a.add_rows.read_text())["rows"] if a.add_rows else []
    for tool in a.tools.split(","):
        rows.append({"tool": tool, **run_tool(tool, spec, a.cache / tool, __file__, run_loraforge, a.timeout)})
        keep_rows(a.out, {**head, "rows": rows})
    emit({**head, "rows": rows, "ratios": ratios(rows)}, a.out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
