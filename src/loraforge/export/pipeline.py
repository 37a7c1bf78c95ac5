"""`loraforge export gguf RUN_DIR`: a run folder to GGUF files and an Ollama Modelfile.

    loraforge export gguf runs/x                       # merged model, q4_k_m -> runs/x/gguf/
    loraforge export gguf runs/x --quant q8_0          # or f16; both need no llama.cpp build
    loraforge export gguf runs/x --adapter-only        # base GGUF + GGUF LoRA + Modelfile with ADAPTER
    loraforge export gguf runs/x --no-imatrix          # q4_k_m without the importance matrix

q4_k_m is calibrated by default: an importance matrix from the run's training conversations and the
packaged general prompts (export.imatrix) tells llama.cpp's quantizer which columns matter.

The output folder holds the GGUF file(s), a `Modelfile` (`ollama create NAME -f Modelfile`) and
EXPORT.json, which records the run, the base, the quantisation and the time taken.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import LoraforgeError
from loraforge.export.gguf import (
    MODEL_QUANTS,
    quantize_gguf,
    require_llama_cpp,
    write_model_gguf,
)
from loraforge.export.imatrix import calibration_texts, importance_matrix
from loraforge.export.lora_gguf import write_lora_gguf
from loraforge.export.merge import check_adapter_fits, merged_model
from loraforge.export.modelfile import write_modelfile
from loraforge.model.load import load_base, load_tokenizer
from loraforge.train.run_files import RunFiles


@dataclass
class ExportResult:
    out_dir: Path
    model_file: Path
    modelfile: Path
    adapter_file: Path | None = None
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


def write_quantised(model, tokenizer, path: Path, quant: str, *, name: str, description: str,
                    imatrix: dict | None = None) -> Path:
    """f16/q8_0 written directly; q4_k_m = f16 written, then llama.cpp's quantizer, then the f16 removed."""
    if quant != "q4_k_m":
        return write_model_gguf(model, tokenizer, path, quant, name=name, description=description)
    staging = path.with_name(path.stem + ".f16-staging.gguf")
    try:
        write_model_gguf(model, tokenizer, staging, "f16", name=name, description=description)
        return quantize_gguf(staging, path, quant, imatrix=imatrix)
    finally:
        staging.unlink(missing_ok=True)


def calibrate(model, tokenizer, run_config: dict, timings: dict) -> tuple[dict, str]:
    """The importance matrix for q4_k_m and a line saying what text it was computed on."""
    started = time.perf_counter()
    texts, source = calibration_texts(tokenizer, run_config)
    imatrix = importance_matrix(model, tokenizer, texts)
    timings["imatrix_s"] = round(time.perf_counter() - started, 2)
    return imatrix, source


def check_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LoraforgeError("the export folder already exists and is not empty", where=str(out),
                             hint="pass --overwrite, or --out with another folder")
    return out


def prepare_out(out: Path) -> Path:
    """Empty the output folder, once the model is loaded and merged (so a failure leaves it alone)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def export_gguf(run_dir: str | Path | RunFiles, out_dir: str | Path | None = None, *, quant: str = "q4_k_m",
                adapter_only: bool = False, base: str | None = None, overwrite: bool = False,
                name: str | None = None, use_imatrix: bool = True) -> ExportResult:
    """Export a run as GGUF (merged, or base + LoRA with adapter_only) with a Modelfile beside it.
    q4_k_m is calibrated with an importance matrix unless use_imatrix is False."""
    if quant not in MODEL_QUANTS:
        raise LoraforgeError(f"--quant {quant} is not available", hint=f"use one of {', '.join(MODEL_QUANTS)}")
    if quant == "q4_k_m":
        require_llama_cpp()                     # fail before minutes of work, not after
    started = time.perf_counter()
    timings: dict[str, float] = {}
    files = RunFiles.resolve(run_dir, base)     # a missing adapter fails here, before any loading
    name = name or files.run_dir.resolve().name
    out = check_out(Path(out_dir) if out_dir else files.run_dir / "gguf", overwrite)
    desc = f"loraforge export of run {files.run_dir} (base {files.base_model})"
    if adapter_only:
        model, _, base_path = load_base(files.base_model, dtype="float32", device="cpu")
        check_adapter_fits(model, files.adapter_dir)
        tokenizer = load_tokenizer(files.tokenizer_source(base_path))
        stem, gname, gdesc = f"base-{quant}", Path(base_path).name, f"base model of {desc}"
    else:
        m = merged_model(files)
        model, tokenizer, base_path = m.model, m.tokenizer, m.base_path
        stem, gname, gdesc = f"{name}-{quant}", name, desc
    timings["load_s"] = round(time.perf_counter() - started, 2)
    imatrix, calibration = calibrate(model, tokenizer, files.run_config, timings) \
        if quant == "q4_k_m" and use_imatrix else (None, None)
    prepare_out(out)
    t = time.perf_counter()
    model_file = write_quantised(model, tokenizer, out / f"{stem}.gguf", quant, name=gname, description=gdesc,
                                 imatrix=imatrix)
    adapter_file = None
    if adapter_only:
        adapter_file = write_lora_gguf(files, model.config, out / f"{name}-lora-f32.gguf")
    timings["write_s"] = round(time.perf_counter() - t, 2)
    system = (files.run_config.get("data") or {}).get("system_prompt")
    modelfile = write_modelfile(out / "Modelfile", f"./{model_file.name}", tokenizer, system=system,
                                adapter_file=f"./{adapter_file.name}" if adapter_file else None,
                                header=f"made by loraforge from {files.run_dir}\n"
                                       f"ollama create {name.lower()} -f Modelfile")
    seconds = round(time.perf_counter() - started, 2)
    info = {"made_by": "loraforge export gguf", "run_dir": str(files.run_dir), "base_model": files.base_model,
            "base_path": base_path, "quant": quant, "imatrix": calibration, "adapter_only": adapter_only,
            "model_file": model_file.name, "adapter_file": adapter_file.name if adapter_file else None,
            "seconds": seconds, **timings, "run_config": files.run_config}
    (out / "EXPORT.json").write_text(json.dumps(info, indent=1, default=str))
    return ExportResult(out, model_file, modelfile, adapter_file, seconds, timings)
