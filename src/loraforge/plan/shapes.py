"""Model shapes for planning: the handful of numbers that decide memory and FLOPs, never the weights.

    from loraforge.plan.shapes import resolve_shape
    shape = resolve_shape("meta-llama/Llama-3.1-8B-Instruct")   # built-in table
    shape = resolve_shape("models/my-llama")                     # a local folder with config.json

A shape comes from (in this order) a local folder or `config.json` file, the Hugging Face cache already on
disk (nothing is downloaded), or the built-in table of popular Llama-style families below, whose numbers are
copied from each model's public `config.json` (Gemma 3 4B+: the text model only, without the vision tower).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import LoraforgeError


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: gated MLP, grouped-query attention, optional tied embeddings."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int = 0  # 0 = hidden // heads
    family: str = "llama"  # config.json's model_type: decides whether the trainer's fast path runs it

    @property
    def fast_path_capable(self) -> bool:
        """True for the families loraforge.model.fast trains (Llama 3.x, Mistral, Qwen2/2.5/3, SmolLM)."""
        return self.family in FAST_FAMILIES

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module in one decoder layer, by its usual name."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            # fused names used by Phi-3/Phi-4 checkpoints
            "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i),
        }

    @property
    def layer_linear_params(self) -> int:
        """Weights of the seven unfused linear modules of one layer (the fused names overlap them)."""
        dims = self.linear_dims()
        return sum(a * b for name, (a, b) in dims.items() if name not in FUSED_MODULES)

    @property
    def linear_params(self) -> int:
        return self.layers * self.layer_linear_params

    @property
    def embedding_params(self) -> int:
        """Input embedding plus, when untied, the lm_head."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


FUSED_MODULES = ("qkv_proj", "gate_up_proj")
FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # as loraforge.model.fast.llama.FAMILIES (no import: plan)

# name: (hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied) from the public config.json files.
_TABLE: dict[str, tuple[int, int, int, int, int, int, int, bool]] = {
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 64, 128256, True),
    "Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128, 128256, True),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128, 128256, False),
    "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128, 128256, False),
    "Mistral-7B-v0.1": (4096, 14336, 32, 32, 8, 128, 32000, False),
    "Mistral-7B-v0.3": (4096, 14336, 32, 32, 8, 128, 32768, False),
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 64, 151936, True),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 128, 151936, True),
    "Qwen2.5-3B": (2048, 11008, 36, 16, 2, 128, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 128, 152064, False),
    "Qwen2.5-14B": (5120, 13824, 48, 40, 8, 128, 152064, False),
    "Qwen2.5-32B": (5120, 27648, 64, 40, 8, 128, 152064, False),
    "Qwen2.5-72B": (8192, 29568, 80, 64, 8, 128, 152064, False),
    "Qwen3-0.6B": (1024, 3072, 28, 16, 8, 128, 151936, True),
    "Qwen3-1.7B": (2048, 6144, 28, 16, 8, 128, 151936, True),
    "Qwen3-4B": (2560, 9728, 36, 32, 8, 128, 151936, True),
    "Qwen3-8B": (4096, 12288, 36, 32, 8, 128, 151936, False),
    "Qwen3-14B": (5120, 17408, 40, 40, 8, 128, 151936, False),
    "Qwen3-32B": (5120, 25600, 64, 64, 8, 128, 151936, False),
    "Gemma-2-2B": (2304, 9216, 26, 8, 4, 256, 256000, True),
    "Gemma-2-9B": (3584, 14336, 42, 16, 8, 256, 256000, True),
    "Gemma-2-27B": (4608, 36864, 46, 32, 16, 128, 256000, True),
    "Gemma-3-1B": (1152, 6912, 26, 4, 1, 256, 262144, True),
    "Gemma-3-4B": (2560, 10240, 34, 8, 4, 256, 262208, True),
    "Gemma-3-12B": (3840, 15360, 48, 16, 8, 256, 262208, True),
    "Gemma-3-27B": (5376, 21504, 62, 32, 16, 128, 262208, True),
    "Phi-3-mini": (3072, 8192, 32, 32, 32, 96, 32064, False),
    "Phi-3-medium": (5120, 17920, 40, 40, 10, 128, 32064, False),
    "Phi-4-mini": (3072, 8192, 32, 24, 8, 128, 200064, True),
    "Phi-4": (5120, 17920, 40, 40, 10, 128, 100352, False),
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 64, 49152, True),
    "SmolLM2-360M": (960, 2560, 32, 15, 5, 64, 49152, True),
    "SmolLM2-1.7B": (2048, 8192, 24, 32, 32, 64, 49152, True),
}
_FAMILY_PREFIXES = {"Qwen2.5": "qwen2", "Qwen3": "qwen3", "Mistral": "mistral", "Gemma-2": "gemma2",
                    "Gemma-3": "gemma3_text", "Phi": "phi3"}
KNOWN_MODELS: dict[str, ModelShape] = {
    name: ModelShape(name, *row[:5], vocab=row[6], tied_embeddings=row[7], head_dim=row[5],
                     family=next((f for pre, f in _FAMILY_PREFIXES.items() if name.startswith(pre)), "llama"))
    for name, row in _TABLE.items()}

# Other spellings of the same architecture (normalised as `_key` does), e.g. Llama 3.0/3.3 share 3.1's shapes.
_ALIASES = {
    "llama-3-8b": "Llama-3.1-8B", "meta-llama-3-8b": "Llama-3.1-8B", "meta-llama-3.1-8b": "Llama-3.1-8B",
    "llama-3-70b": "Llama-3.1-70B", "meta-llama-3-70b": "Llama-3.1-70B", "meta-llama-3.1-70b": "Llama-3.1-70B",
    "llama-3.3-70b": "Llama-3.1-70B", "mistral-7b": "Mistral-7B-v0.3", "mistral-7b-v0.2": "Mistral-7B-v0.1",
    "phi-3-mini-4k": "Phi-3-mini", "phi-3-mini-128k": "Phi-3-mini", "phi-3.5-mini": "Phi-3-mini",
    "phi-3-medium-4k": "Phi-3-medium", "phi-3-medium-128k": "Phi-3-medium",
}
_NOISE = re.compile(r"^(instruct|it|chat|hf|base|bnb|4bit|unsloth|\d{4})$")  # release tags, not architecture


def _key(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b' (org, case, separators and release tags dropped)."""
    base = name.strip().rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-").replace(" ", "-")
    return "-".join(part for part in base.split("-") if not _NOISE.match(part))


_LOOKUP = {**{_key(n): n for n in KNOWN_MODELS}, **_ALIASES}


def shape_from_config(config: dict, name: str) -> ModelShape:
    """Read a Hugging Face `config.json` dict of a Llama-style decoder (multimodal: its `text_config`)."""
    cfg = {**config, **config.get("text_config", {})}
    if any(k in cfg for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise LoraforgeError("mixture-of-experts models are not supported by `plan` yet", where=name)
    needed = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in needed if not isinstance(cfg.get(k), int)]
    if missing:
        raise LoraforgeError(f"config.json lacks {', '.join(missing)}; `plan` reads Llama-style decoder configs",
                             where=name, hint="pass a known family with --model, e.g. --model llama-3.1-8b")
    heads = cfg["num_attention_heads"]
    return ModelShape(
        name=name, hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
        vocab=cfg["vocab_size"], head_dim=cfg.get("head_dim") or 0,
        # absent means untied in Llama/Qwen/Mistral configs; assuming untied never under-counts memory
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        family=str(cfg.get("model_type") or "llama"),
    )


def _read_config_json(path: Path, name: str) -> ModelShape:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LoraforgeError(f"cannot read model config: {e}", where=str(path)) from None
    if not isinstance(config, dict):
        raise LoraforgeError("config.json is not a JSON object", where=str(path))
    return shape_from_config(config, name)


def _hf_cache_config(repo_id: str) -> Path | None:
    """config.json of `org/name` if a snapshot is already in the local Hugging Face cache."""
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = root.expanduser() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1] if found else None


def _size_b(key: str) -> float | None:
    """Parameter count in billions written in a name ('llama-3.1-8b' -> 8.0, 'smollm2-135m' -> 0.135)."""
    found = re.search(r"-(\d+(?:\.\d+)?)([bm])(?:-|$)", key)
    return None if not found else float(found[1]) / (1000 if found[2] == "m" else 1)


def closest_models(name: str, n: int = 3) -> list[str]:
    """Known models whose names look like `name`: same family first, then nearest in size."""
    key = _key(name)
    close = list(dict.fromkeys(_LOOKUP[c] for c in difflib.get_close_matches(key, list(_LOOKUP), n=8, cutoff=0.5)))
    family, size = key.split("-")[0], _size_b(key)
    close.sort(key=lambda known: (_key(known).split("-")[0] != family,
                                  abs(math.log((_size_b(_key(known)) or 1e6) / size)) if size else 0.0))
    return close[:n]


def resolve_shape(model: str) -> ModelShape:
    """The shape of `model`: a local folder/config.json, a cached Hub id, or a built-in family name."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraforgeError("folder has no config.json", where=str(path),
                                 hint="point at a Hugging Face model folder, or pass a family name")
        return _read_config_json(path / "config.json", path.name)
    if path.is_file():
        if path.suffix != ".json":
            raise LoraforgeError("`plan` reads model shapes from config.json only", where=str(path),
                                 hint="pass the family name instead, e.g. --model smollm2-135m")
        return _read_config_json(path, path.parent.name or path.stem)
    known = _LOOKUP.get(_key(model))
    if known:
        return KNOWN_MODELS[known]
    cached = _hf_cache_config(model) if model.count("/") == 1 else None
    if cached:
        return _read_config_json(cached, model)
    names = closest_models(model)
    maybe = f" Did you mean {', '.join(names)}?" if names else ""
    raise LoraforgeError(f"unknown model '{model}'.{maybe}",
                         hint="pass a local folder with config.json, or one of: " + ", ".join(KNOWN_MODELS))
