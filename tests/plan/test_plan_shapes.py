"""Model shapes: the built-in table matches published parameter counts, names resolve, config.json is read."""

from __future__ import annotations

import json

import pytest

from loraforge.errors import LoraforgeError
from loraforge.plan import KNOWN_MODELS, resolve_shape


@pytest.mark.parametrize("name, params_b", [
    ("Llama-3.1-8B", 8.03), ("Llama-3.2-1B", 1.24), ("Llama-3.1-70B", 70.55), ("Mistral-7B-v0.3", 7.25),
    ("Qwen2.5-7B", 7.62), ("Qwen3-8B", 8.19), ("Gemma-2-9B", 9.24), ("Phi-4", 14.66), ("SmolLM2-135M", 0.135),
])
def test_param_counts_match_published(name, params_b):
    assert KNOWN_MODELS[name].params / 1e9 == pytest.approx(params_b, rel=0.01)


@pytest.mark.parametrize("given, expected", [
    ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B"),
    ("meta-llama/Meta-Llama-3-8B", "Llama-3.1-8B"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "Mistral-7B-v0.3"),
    ("smollm2-135m-instruct", "SmolLM2-135M"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B"),
    ("google/gemma-3-4b-it", "Gemma-3-4B"),
    ("microsoft/Phi-3.5-mini-instruct", "Phi-3-mini"),
])
def test_names_resolve(given, expected):
    assert resolve_shape(given).name == expected


def test_unknown_model_suggests_closest():
    with pytest.raises(LoraforgeError, match="unknown model 'llama-3.1-7b'. Did you mean Llama-3.1-8B"):
        resolve_shape("llama-3.1-7b")


LLAMA_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 600, "tie_word_embeddings": True}


def test_local_folder_and_file(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    shape = resolve_shape(str(folder))
    assert (shape.name, shape.hidden, shape.kv_dim, shape.tied_embeddings) == ("tiny", 64, 32, True)
    assert shape.params == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64 + 600 * 64
    assert resolve_shape(str(folder / "config.json")) == shape


def test_multimodal_text_config_and_explicit_head_dim(tmp_path):
    cfg = {"model_type": "gemma3", "text_config": {**LLAMA_CONFIG, "head_dim": 32}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_shape(str(tmp_path)).q_dim == 4 * 32


def test_hf_cache_is_read_without_downloading(tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--tiny-chat" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_shape("acme/tiny-chat").hidden == 64


@pytest.mark.parametrize("config, message", [
    ({"hidden_size": 64}, "lacks intermediate_size"),
    ({**LLAMA_CONFIG, "num_local_experts": 8}, "mixture-of-experts"),
])
def test_unusable_configs_are_clear_errors(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoraforgeError, match=message):
        resolve_shape(str(tmp_path))


def test_folder_without_config(tmp_path):
    with pytest.raises(LoraforgeError, match="no config.json"):
        resolve_shape(str(tmp_path))
