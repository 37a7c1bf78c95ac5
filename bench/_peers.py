"""What the end-to-end benchmarks (train_e2e.py, preference_speed.py) share: `loraforge train` on a config as
users run it, a peer's model set up as its own docs do (Unsloth's notebooks, or plain transformers + PEFT +
bitsandbytes), and a peer run in a child process of its own (one result line on stdout)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def loraforge_train(cfg: dict, work: Path, *args: str) -> tuple[dict | None, float, str]:
    """Write `cfg` as work/run.yaml and run `python -m loraforge train` on it (with --overwrite: the bench's own
    scratch folder, re-run by a later call on the same machine). Returns (summary.json or None when the command
    failed, wall seconds, its output; the output is also in work/log.txt)."""
    import yaml

    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "loraforge", "train", str(path), "--overwrite", *args],
                          capture_output=True, text=True)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    (work / "log.txt").write_text(log)
    summary = None if proc.returncode else json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())
    return summary, wall, log


def peer_model(tool: str, model_dir: str, max_seq_length: int, *, qlora: bool, r: int, dropout: float,
               seed: int):
    """(model, tokenizer, the trainer's extra kwargs) for `unsloth-trl` (FastLanguageModel + get_peft_model with
    its offloaded checkpointing, as its notebooks) or `trl` (transformers + bitsandbytes NF4 with double
    quantisation when `qlora`, a PEFT LoraConfig for the trainer). Unsloth must be imported before transformers:
    call this first in the child process. On CPU (a smoke test of the set-up) nothing is quantised."""
    import torch

    if tool == "unsloth-trl":
        from unsloth import FastLanguageModel  # noqa: first, it patches transformers and TRL

        model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=max_seq_length, dtype=None,
                                                       load_in_4bit=qlora, local_files_only=True)
        model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=r, lora_dropout=dropout, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                 random_state=seed)
        return model, tok, {}
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if qlora and cuda else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0} if cuda else None,
                                                 quantization_config=quant, attn_implementation="sdpa")
    peft_config = LoraConfig(r=r, lora_alpha=r, lora_dropout=dropout, target_modules=TARGETS, bias="none",
                             task_type="CAUSAL_LM")
    return model, AutoTokenizer.from_pretrained(model_dir), {"peft_config": peft_config}


def run_child(cmd: list[str], work: Path, timeout: int) -> dict:
    """Run a peer's child process (stderr kept in work/log.txt, also when it times out); its result is the last
    stdout line starting with "RESULT ", else an error row."""
    try:
        with (work / "log.txt").open("w") as log:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[-1][7:]) if line else {"error": (work / "log.txt").read_text()[-3000:]
                                                   + proc.stdout[-500:]}


def print_result(row: dict) -> None:
    """The child's side of run_child."""
    print("RESULT " + json.dumps(row))


def timed_train(trainer) -> tuple[object, float, dict]:
    """A peer's trainer.train() from a synchronised start: (its output, seconds, torch's peak reserved and
    allocated GiB over it; None on CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    secs = time.time() - t0
    peaks = {"peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 3) if cuda else None,
             "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if cuda else None}
    return out, secs, peaks


def run_tool(tool: str, spec: dict, work: Path, script: str, ours, timeout: int) -> dict:
    """One tool's row on `spec`, in `work`: loraforge in this process (`ours(spec, work)`), a peer as `script`'s
    `child` process (its own imports: Unsloth patches transformers)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    if tool == "loraforge":
        return ours(spec, work)
    return run_child([sys.executable, script, "child", "--tool", tool, "--spec", str(work / "spec.json")], work,
                     timeout)


def keep_rows(out: Path | None, doc: dict) -> None:
    """Print the newest row and write what is done so far to `out`: a call cut short keeps it."""
    print(json.dumps(doc["rows"][-1])[:400], file=sys.stderr, flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))


def tiny_llama(tokenizer_dir: str, out: Path, shape: dict) -> str:
    """A random Llama of `shape` with the tokenizer's vocabulary, saved once to `out` with the tokenizer (the
    CPU smoke tests' model)."""
    if not (out / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=None,
                                     pad_token_id=tok.pad_token_id, **shape)).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)
