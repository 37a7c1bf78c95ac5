"""A PEFT LoRA adapter as a GGUF LoRA file, for `llama.cpp --lora` and Ollama's `ADAPTER`.

    write_lora_gguf(run_files, base_config, "adapter-lora-f32.gguf")

Each adapted linear layer becomes `<gguf tensor name>.lora_a` (r x in) and `.lora_b` (out x r), and
the file carries `adapter.lora.alpha`; llama.cpp scales by alpha / r as PEFT does. Where PEFT's scale is
not alpha / r for one shared alpha (rsLoRA, per-module rank or alpha patterns), the scale is folded
into lora_b and alpha is written as 0, which llama.cpp reads as "scale 1". The rows of lora_b of Q and
K projections get the same rotary permutation as the base weights. DoRA has no GGUF form: merge it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError
from loraforge.export.gguf import arch_of, finish_gguf, head_counts, permute_rotary, tensor_name_map


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the longest key that ends the module name."""
    hits = [k for k in patterns if module == k or module.endswith("." + k)]
    return patterns[max(hits, key=len)] if hits else default


def lora_pairs(adapter_dir: Path) -> dict[str, dict]:
    """Base weight name (model.layers.0.self_attn.q_proj.weight) -> {"A": tensor, "B": tensor}."""
    from safetensors.torch import load_file

    pairs: dict[str, dict] = {}
    for name, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        if ".lora_A." not in name and ".lora_B." not in name:
            raise LoraforgeError(f"the adapter holds '{name}', which a GGUF LoRA cannot carry (trained embeddings "
                                 "or modules_to_save)", where=str(adapter_dir), hint="export the merged model instead")
        base = name.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight") \
            .replace(".lora_B.weight", ".weight")
        pairs.setdefault(base, {})["A" if ".lora_A." in name else "B"] = t
    return pairs


def write_lora_gguf(files, base_config, path: str | Path) -> Path:
    """Write the run's adapter (`files`: train.run_files.RunFiles) as a GGUF LoRA for a base with `base_config`."""
    import gguf
    import torch

    cfg = files.adapter_config
    if cfg.get("use_dora"):
        raise LoraforgeError("a DoRA adapter has no GGUF LoRA form", where=str(files.adapter_dir),
                             hint="export the merged model (leave out --adapter-only)")
    arch = arch_of(base_config)
    model_arch = getattr(gguf.MODEL_ARCH, arch.gguf_name)
    names = tensor_name_map(base_config)
    n_head, n_kv, _ = head_counts(base_config)
    r0, alpha0 = cfg.get("r", 8), float(cfg.get("lora_alpha", 8))
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    fold = bool(cfg.get("use_rslora") or rank_pat or alpha_pat)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[model_arch])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0 if fold else alpha0)
    w.add_name(path.stem)
    for base_name, ab in sorted(lora_pairs(files.adapter_dir).items()):
        if set(ab) != {"A", "B"}:
            raise LoraforgeError(f"the adapter has only half of the LoRA pair for {base_name}",
                                 where=str(files.adapter_dir))
        gname = names.get_name(base_name, try_suffixes=(".weight",))
        if gname is None:
            raise LoraforgeError(f"the GGUF export does not know where '{base_name}' goes",
                                 where=str(files.adapter_dir))
        a = ab["A"].to(torch.float32).numpy()
        b = ab["B"].to(torch.float32).numpy()
        if fold:
            module = base_name.removesuffix(".weight")
            r, alpha = _pattern(rank_pat, module, r0), float(_pattern(alpha_pat, module, alpha0))
            b = b * (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)
        if arch.permute_qk and base_name.endswith("q_proj.weight"):
            b = permute_rotary(b, n_head)
        elif arch.permute_qk and base_name.endswith("k_proj.weight"):
            b = permute_rotary(b, n_kv)
        w.add_tensor(gname + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(gname + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    return finish_gguf(w, tmp, path)
