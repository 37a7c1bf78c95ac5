"""GGUF files for llama.cpp / Ollama from a Llama-family transformers model (the only llama.cpp user).

    write_model_gguf(model, tokenizer, "model-f16.gguf", "f16")     # f32 | f16 | q8_0, pure Python
    quantize_gguf("model-f16.gguf", "model-q4_k_m.gguf", "q4_k_m")  # llama.cpp's own quantizer

Architectures: Llama, Mistral, SmolLM (all `llama` in GGUF), Qwen2 and Qwen3. Hyperparameters and
tensor names come from the `gguf` package's constants (gguf.get_tensor_name_map); the Q and K
projections of `llama` models are permuted from the Hugging Face rotary layout (halves) to the one
llama.cpp uses (interleaved pairs), as llama.cpp's converter does. 1-D tensors stay F32.
q8_0 is written with gguf's Q8_0 (bit-exact with ggml's reference, which a test checks against
llama.cpp); K-quants (q4_k_m) go through `llama_model_quantize` of llama-cpp-python, optionally with an
importance matrix computed by export.imatrix.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.errors import LoraforgeError
from loraforge.export.vocab import gguf_vocab
from loraforge.files import tmp_path

MODEL_QUANTS = ("f16", "q8_0", "q4_k_m")
WRITER_TYPES = ("f32", "f16", "q8_0")     # what write_model_gguf writes itself
LLAMA_CPP_HINT = ("pip install llama-cpp-python  (there is no wheel on PyPI: it compiles llama.cpp, which "
                  "needs a C++ compiler and cmake and takes a few minutes)")


@dataclass(frozen=True)
class Arch:
    gguf_name: str           # the MODEL_ARCH member name in gguf
    permute_qk: bool         # HF rotary halves -> llama.cpp interleaved pairs


ARCHES = {
    "LlamaForCausalLM": Arch("LLAMA", True),
    "MistralForCausalLM": Arch("LLAMA", True),
    "Qwen2ForCausalLM": Arch("QWEN2", False),
    "Qwen3ForCausalLM": Arch("QWEN3", False),
}


def arch_of(config) -> Arch:
    names = list(getattr(config, "architectures", None) or [])
    for n in names:
        if n in ARCHES:
            return ARCHES[n]
    raise LoraforgeError(f"GGUF export does not support the architecture {names or config.model_type}",
                         hint=f"supported: {', '.join(ARCHES)}")


def require_llama_cpp():
    """The llama_cpp module, or a LoraforgeError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise LoraforgeError("this needs llama-cpp-python (llama.cpp's quantizer)", hint=LLAMA_CPP_HINT) from None
    return llama_cpp


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q/K projection (or bias) from HF's rotate-half order to llama.cpp's pairwise order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def head_counts(config) -> tuple[int, int, int]:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return n_head, n_kv, head_dim


def rope_settings(config) -> tuple[float, dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    scaling = params if "rope_type" in params else (getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), dict(scaling)


def llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency factors of Llama 3.1-style rope scaling (llama.cpp reads them as rope_freqs)."""
    theta, s = rope_settings(config)
    _, _, dim = head_counts(config)
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_hparams(w, config) -> None:
    n_head, n_kv, head_dim = head_counts(config)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    theta, scaling = rope_settings(config)
    w.add_rope_freq_base(theta)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif kind not in ("default", "llama3"):     # llama3 is carried by the rope_freqs tensor
        raise LoraforgeError(f"rope scaling '{kind}' is not supported by the GGUF export",
                             hint="supported: none, linear, llama3")


def tensor_name_map(config):
    """gguf's Hugging Face -> GGUF tensor name map for this model (get_name(hf_name, try_suffixes))."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, arch_of(config).gguf_name)
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def gguf_tensors(state_dict: dict, config):
    """(GGUF name, float32 numpy array) for every weight, named and laid out as llama.cpp expects."""
    import gguf
    import torch

    arch = arch_of(config)
    n_head, n_kv, _ = head_counts(config)
    names = tensor_name_map(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, t in state_dict.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LoraforgeError(f"the GGUF export does not know where tensor '{hf_name}' goes")
        arr = t.detach().to(torch.float32).cpu().numpy()
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = permute_rotary(arr, n_head)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = permute_rotary(arr, n_kv)
        yield name, np.ascontiguousarray(arr)
    _, scaling = rope_settings(config)
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config)


def encode_tensor(name: str, arr: np.ndarray, outtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D and norm tensors F32, the rest as `outtype`."""
    import gguf

    if arr.ndim < 2 or outtype == "f32" or name == "rope_freqs.weight":
        return arr.astype(np.float32), None
    if outtype == "q8_0" and arr.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(arr, q), q
    return to_f16(arr), None


def to_f16(arr: np.ndarray) -> np.ndarray:
    """float32 -> float16, rounded to nearest even like numpy's astype (a test checks bit equality), but
    with torch's cast, which uses every core: numpy's runs on one, minutes for an 8B model."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(torch.float16).numpy()


def file_type(outtype: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def write_model_gguf(model, tokenizer, path: str | Path, outtype: str = "f16", *, name: str | None = None,
                     description: str | None = None) -> Path:
    """Write `model` (a transformers causal LM) and its tokenizer as one GGUF file, atomically."""
    import gguf

    if outtype not in WRITER_TYPES:
        raise LoraforgeError(f"the GGUF writer writes {', '.join(WRITER_TYPES)}, not '{outtype}'",
                             hint="q4_k_m is made from an f16 file by quantize_gguf")
    config = model.config
    arch = arch_of(config)
    vocab = gguf_vocab(tokenizer, config.vocab_size)   # fails early on an unsupported tokenizer
    path = Path(path)
    tmp = tmp_path(path)
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_name)])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or path.stem)
    if description:
        w.add_description(description)
    write_hparams(w, config)
    w.add_file_type(file_type(outtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(w)
    for gname, arr in gguf_tensors(model.state_dict(), config):
        data, raw = encode_tensor(gname, arr, outtype)
        w.add_tensor(gname, data, raw_dtype=raw)
    return finish_gguf(w, tmp, path)


def finish_gguf(w, tmp: Path, path: Path) -> Path:
    """Write a GGUFWriter's header, metadata and tensors to `tmp`, then rename it to `path` (atomic)."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


LLAMA_FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


@contextlib.contextmanager
def captured_fds(sink: list):
    """Send what C code prints on stdout/stderr to a temporary file; its text is appended to `sink`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            sink.append(f.read().decode(errors="replace"))


def imatrix_array(llama_cpp, imatrix: dict[str, np.ndarray]):
    """The NULL-terminated llama_model_imatrix_data array llama.cpp reads (keep it alive while used)."""
    import ctypes

    arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    bufs = []
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        buf = np.ascontiguousarray(values, dtype=np.float32)
        bufs.append(buf)
        arr[i].name = name.encode()
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    arr[len(imatrix)].name = None
    return arr, bufs


def quantize_gguf(src: str | Path, dst: str | Path, quant: str, threads: int | None = None,
                  imatrix: dict[str, np.ndarray] | None = None) -> Path:
    """llama.cpp's `llama_model_quantize` (the code behind llama-quantize) from src to dst, optionally
    with an importance matrix (GGUF tensor name -> per-column weights, see export.imatrix).
    llama.cpp's log is kept out of the terminal; its last lines are shown when quantisation fails."""
    import ctypes

    llama_cpp = require_llama_cpp()
    if quant not in LLAMA_FTYPES:
        raise LoraforgeError(f"unknown quantisation '{quant}'", hint=f"use one of {', '.join(LLAMA_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[quant])
    params.nthread = threads or len(os.sched_getaffinity(0)) or 1     # the CPUs this process may use
    if imatrix:
        arr, _bufs = imatrix_array(llama_cpp, imatrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    dst = Path(dst)
    tmp = tmp_path(dst)
    log: list[str] = []
    with captured_fds(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join("".join(log).strip().splitlines()[-5:])
        raise LoraforgeError(f"llama.cpp could not quantise this file to {quant} (code {rc}):\n{tail}",
                             where=str(src))
    tmp.replace(dst)
    return dst
