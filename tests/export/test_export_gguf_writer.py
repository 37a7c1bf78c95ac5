"""The GGUF writer, read back with gguf.GGUFReader: metadata, tokenizer, tensor names, shapes and types,
the Q/K rotary permutation, tied/untied heads, Qwen2 biases and Qwen3 q/k norms; and the tokenizer
metadata rules (pre-tokenizer recognition, end-of-turn token)."""

import json

import gguf
import numpy as np
import pytest
from conftest import make_tokenizer
from export_helpers import tiny

from loraforge.errors import LoraforgeError
from loraforge.export.gguf import permute_rotary, write_model_gguf
from loraforge.export.vocab import end_of_turn, gguf_vocab, pre_tokenizer_name


def read(path):
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    model, tok = tiny("llama")
    d = tmp_path_factory.mktemp("gguf")
    return model, tok, {q: write_model_gguf(model, tok, d / f"m-{q}.gguf", q) for q in ("f32", "f16", "q8_0")}


def test_metadata_and_tokenizer(llama_files):
    _, tok, files = llama_files
    kv, _ = read(files["f16"])
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == 1
    assert kv["llama.block_count"] == 2 and kv["llama.embedding_length"] == 64
    assert kv["llama.attention.head_count"] == 4 and kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.rope.dimension_count"] == 16 and kv["llama.context_length"] == 256
    assert kv["llama.vocab_size"] == len(tok) + 9
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(tok) + 9                  # padded to the model's vocab
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]
    assert tokens[-1] == f"[PAD{len(tok) + 8}]" and types[-1] == 5
    assert tokens[10] == tok.convert_ids_to_tokens(10) and types[10] == 1
    first = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"][0]
    assert kv["tokenizer.ggml.merges"][0] == (" ".join(first) if isinstance(first, list) else first)
    assert kv["tokenizer.ggml.eos_token_id"] == 2 and kv["tokenizer.ggml.padding_token_id"] == 0
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.chat_template"] == tok.chat_template


def test_tensor_names_shapes_and_types(llama_files):
    _, _, files = llama_files
    _, t16 = read(files["f16"])
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}
    assert set(t16) == names                                           # tied: no output.weight
    assert list(t16["blk.0.attn_k.weight"].shape) == [64, 32]          # GGUF shapes are reversed
    assert t16["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert t16["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    _, t8 = read(files["q8_0"])
    assert t8["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0" and t8["token_embd.weight"].tensor_type.name == "Q8_0"
    assert t8["output_norm.weight"].tensor_type.name == "F32"


def test_q_and_k_are_permuted_for_llama_rope(llama_files):
    model, _, files = llama_files
    _, t32 = read(files["f32"])
    sd = model.state_dict()
    q = np.array(t32["blk.1.attn_q.weight"].data)
    k = np.array(t32["blk.1.attn_k.weight"].data)
    assert np.array_equal(q, permute_rotary(sd["model.layers.1.self_attn.q_proj.weight"].numpy(), 4))
    assert np.array_equal(k, permute_rotary(sd["model.layers.1.self_attn.k_proj.weight"].numpy(), 2))
    assert not np.array_equal(q, sd["model.layers.1.self_attn.q_proj.weight"].numpy())
    v = np.array(t32["blk.1.attn_v.weight"].data)
    assert np.array_equal(v, sd["model.layers.1.self_attn.v_proj.weight"].numpy())
    _, t8 = read(files["q8_0"])
    deq = gguf.quants.dequantize(t8["blk.1.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(deq - q).max() <= np.abs(q).max() / 127


def test_untied_qwen2_with_biases_and_qwen3_norms(tmp_path):
    model, tok = tiny("qwen2", tie=False)
    kv, t = read(write_model_gguf(model, tok, tmp_path / "q2.gguf", "f32"))
    assert kv["general.architecture"] == "qwen2" and "output.weight" in t
    assert "blk.0.attn_q.bias" in t and "blk.0.attn_k.bias" in t
    sd = model.state_dict()  # Qwen2 uses NEOX rope in llama.cpp: no permutation
    assert np.array_equal(np.array(t["blk.0.attn_q.weight"].data), sd["model.layers.0.self_attn.q_proj.weight"].numpy())
    model, tok = tiny("qwen3", head_dim=32)
    kv, t = read(write_model_gguf(model, tok, tmp_path / "q3.gguf", "f16"))
    assert kv["general.architecture"] == "qwen3" and "blk.1.attn_q_norm.weight" in t and "blk.1.attn_k_norm.weight" in t
    assert kv["qwen3.attention.key_length"] == 32 and list(t["blk.0.attn_q.weight"].shape) == [64, 128]


def test_unsupported_model_or_tokenizer_is_a_clear_error(tmp_path):
    model, tok = tiny("llama")
    model.config.architectures = ["GPTNeoXForCausalLM"]
    with pytest.raises(LoraforgeError, match="does not support the architecture"):
        write_model_gguf(model, tok, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(LoraforgeError, match="embedding has only 100 rows"):
        gguf_vocab(tok, 100)
    spm_like = make_tokenizer()
    spm_like.backend_tokenizer.decoder = __import__("tokenizers").decoders.Metaspace()
    with pytest.raises(LoraforgeError, match="byte-level BPE"):
        gguf_vocab(spm_like)


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    from loraforge.export.vocab import LLAMA3_REGEX, QWEN2_REGEX

    for regex, name in ((LLAMA3_REGEX, "llama-bpe"), (QWEN2_REGEX, "qwen2")):
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        seq = {"type": "Sequence", "pretokenizers": [split, dict(byte_level, use_regex=False)]}
        assert pre_tokenizer_name(seq) == name
    with pytest.raises(LoraforgeError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_end_of_turn_follows_the_template():
    assert end_of_turn(make_tokenizer()) == "<|im_end|>"
    llama3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
              " + m['content'] + '<|eot_id|>' }}{% endfor %}")
    tok = make_tokenizer(llama3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                  "<|end_header_id|>", "<|eot_id|>"], eos="<|end_of_text|>", bos="<|begin_of_text|>")
    assert end_of_turn(tok) == "<|eot_id|>"
    v = gguf_vocab(tok)
    assert v.special_ids["eot"] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert v.special_ids["eos"] == tok.convert_tokens_to_ids("<|end_of_text|>")


def test_q4_k_m_without_llama_cpp_says_how_to_install(tiny_model, monkeypatch, tmp_path, capsys):
    import sys

    from loraforge.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # as if llama-cpp-python were not installed
    assert main(["export", "gguf", str(tmp_path), "--quant", "q4_k_m"]) == 2
    err = capsys.readouterr().err
    assert "needs llama-cpp-python" in err and "pip install llama-cpp-python" in err and "Traceback" not in err
