"""Fold a run's adapter into its base model: the function behind `loraforge merge RUN_DIR`.

    loraforge merge runs/x                      # -> runs/x/merged/ (bf16 safetensors + tokenizer)
    loraforge merge runs/x --out merged --dtype float16

The base is always loaded unquantised in float32 and the LoRA/DoRA delta is added there, so a QLoRA
run merges into the dequantised base and never into 4-bit weights; the result is rounded once, to
the 16-bit dtype asked for. The merged folder carries the tokenizer, chat template, a generation
config whose eos is the template's end-of-turn token, and MERGE.json saying how it was made.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GenerationConfig

from loraforge.errors import LoraforgeError
from loraforge.export.vocab import end_of_turn
from loraforge.model.adapters import load_adapter
from loraforge.model.load import load_base, load_tokenizer
from loraforge.train.run_files import RunFiles

DTYPES = ("bfloat16", "float16")


@dataclass
class Merged:
    model: object              # transformers model with the adapter folded in, float32, eval mode
    tokenizer: object
    files: RunFiles
    base_path: str             # the resolved local base folder


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple]:
    """Tensor name -> shape of a saved adapter, read from the safetensors header only."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise LoraforgeError("only safetensors adapters can be exported", where=str(adapter_dir))
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def check_adapter_fits(model, adapter_dir: Path) -> None:
    """A LoraforgeError naming the first module whose adapter shape does not fit this base model."""
    modules = dict(model.named_modules())
    for name, shape in adapter_shapes(adapter_dir).items():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        mod_name = name.split(".lora_")[0].removeprefix("base_model.model.")
        mod = modules.get(mod_name)
        weight = getattr(mod, "weight", None)
        if weight is None:
            raise LoraforgeError(f"the adapter has weights for '{mod_name}', which this base model does not have",
                                 where=str(adapter_dir), hint="export with the base model it was trained on")
        out_f, in_f = weight.shape
        got, want = (shape[1], in_f) if ".lora_A." in name else (shape[0], out_f)
        if got != want:
            raise LoraforgeError(f"the adapter was trained for another base model: '{mod_name}' has size {got} "
                                 f"in the adapter but {want} in this base (hidden size {model.config.hidden_size})",
                                 where=str(adapter_dir), hint="export with the base model it was trained on "
                                 "(see base_model in the run's config.yaml), or pass --base")


def merged_model(run: str | Path | RunFiles, base: str | None = None) -> Merged:
    """Base (float32, unquantised) + adapter, merged in memory; checks that the adapter fits first."""
    files = RunFiles.resolve(run, base)
    model, _, base_path = load_base(files.base_model, dtype="float32", device="cpu")
    check_adapter_fits(model, files.adapter_dir)
    peft_model = load_adapter(model, files.adapter_dir)
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    merged.eval()
    return Merged(merged, load_tokenizer(files.tokenizer_source(base_path)), files, base_path)


def generation_config_for(model, tokenizer):
    """The model's generation config with eos = the chat template's end-of-turn token (then the eos)."""
    gen = GenerationConfig.from_model_config(model.config) if model.generation_config is None \
        else GenerationConfig(**model.generation_config.to_diff_dict())
    eot = end_of_turn(tokenizer)
    ids = [tokenizer.convert_tokens_to_ids(eot)] if eot else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


def merge_run(run_dir: str | Path, out_dir: str | Path | None = None, *, dtype: str = "bfloat16",
              base: str | None = None, overwrite: bool = False) -> Path:
    """Write the merged 16-bit model folder (atomically) and return its path."""
    if dtype not in DTYPES:
        raise LoraforgeError(f"--dtype {dtype} is not a 16-bit dtype", hint=f"use one of {', '.join(DTYPES)}")
    out = Path(out_dir) if out_dir else Path(run_dir) / "merged"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoraforgeError("the output folder already exists", where=str(out), hint="pass --overwrite or --out")
    started = time.perf_counter()
    m = merged_model(RunFiles.find(run_dir, base))
    model = m.model.to(getattr(torch, dtype))
    model.generation_config = generation_config_for(model, m.tokenizer)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    m.tokenizer.save_pretrained(tmp)
    info = {"made_by": "loraforge merge", "run_dir": str(m.files.run_dir), "adapter_dir": str(m.files.adapter_dir),
            "base_model": m.files.base_model, "base_path": m.base_path, "dtype": dtype,
            "merged_in": "float32 (unquantised base)", "quantization_in_training":
                (m.files.run_config.get("model") or {}).get("quantization", "none"),
            "adapter": {k: m.files.adapter_config.get(k) for k in ("r", "lora_alpha", "use_dora", "use_rslora",
                                                                   "target_modules")},
            "seconds": round(time.perf_counter() - started, 2), "run_config": m.files.run_config}
    (tmp / "MERGE.json").write_text(json.dumps(info, indent=1, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
