"""The exported GGUF files in a real client (llama.cpp through llama-cpp-python), on the tiny model:
same tokens as transformers, same logits (f16), Q8_0 bit-for-bit equal to llama.cpp's own quantizer,
q4_k_m made by llama.cpp, base + GGUF LoRA equal to the merged model, <|im_end|> ends generation,
and the CLI with its errors."""

import gguf
import numpy as np
import pytest
from conftest import train_tiny_run
from export_helpers import assert_same_top1, hf_logits, llama_logits

from loraforge.cli import main
from loraforge.errors import LoraforgeError

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = ["What colour is the apple?", "Tell me about snow and white things.", "Answer with one word only please."]


@pytest.fixture(scope="module")
def merged(tiny_run):
    from loraforge.export.merge import merged_model

    return merged_model(tiny_run)


def chat_ids(tok, prompt: str, answer: str | None = None) -> list[int]:
    msgs = [{"role": "user", "content": prompt}] + ([{"role": "assistant", "content": answer}] if answer else [])
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def f16(tiny_run, tmp_path_factory):
    from loraforge.export.pipeline import export_gguf

    return export_gguf(tiny_run, tmp_path_factory.mktemp("f16"), quant="f16")


def test_llama_cpp_tokenizes_like_transformers(f16, merged):
    from llama_cpp import Llama

    llm = Llama(model_path=str(f16.model_file), vocab_only=True, verbose=False)
    texts = [chat_ids(merged.tokenizer, p, "The sky is blue.") for p in PROMPTS]
    extra = "Hello world! 123 4567  multiple   spaces\n\nCafé déjà vu. <|im_end|> tab\tend"
    for ids, text in zip(texts, [merged.tokenizer.decode(t) for t in texts]):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert llm.tokenize(extra.encode(), add_bos=False, special=True) == \
        merged.tokenizer(extra, add_special_tokens=False)["input_ids"]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    im_end = merged.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert llm.token_eos() == im_end and llama_cpp.llama_vocab_is_eog(vocab, im_end)
    assert llm.metadata["tokenizer.chat_template"] == merged.tokenizer.chat_template


def test_f16_logits_match_transformers(f16, merged):
    for p in PROMPTS:
        ids = chat_ids(merged.tokenizer, p, "The apple is red.")
        want, got = hf_logits(merged.model, ids), llama_logits(f16.model_file, ids)
        err = np.abs(got - want).max()
        assert err < 0.01 * np.abs(want).max()
        assert_same_top1(got, want, tie=2 * err, what=p)


def test_q8_0_is_bit_exact_with_llama_cpps_quantizer(merged, tmp_path):
    from loraforge.export.gguf import quantize_gguf, write_model_gguf

    ours = write_model_gguf(merged.model, merged.tokenizer, tmp_path / "ours-q8_0.gguf", "q8_0")
    f32 = write_model_gguf(merged.model, merged.tokenizer, tmp_path / "m-f32.gguf", "f32")
    theirs = quantize_gguf(f32, tmp_path / "theirs-q8_0.gguf", "q8_0")
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert set(a) == set(b) and sum(t.tensor_type.name == "Q8_0" for t in a.values()) == 15
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.array(t.data).tobytes() == np.array(b[name].data).tobytes(), name


def test_q4_k_m_export(tiny_run, merged, tmp_path):
    import json

    from loraforge.export.pipeline import export_gguf

    plain = export_gguf(tiny_run, tmp_path / "plain", quant="q4_k_m", use_imatrix=False)
    assert json.loads((plain.out_dir / "EXPORT.json").read_text())["imatrix"] is None
    res = export_gguf(tiny_run, tmp_path / "q4", quant="q4_k_m")
    assert "general prompts" in json.loads((res.out_dir / "EXPORT.json").read_text())["imatrix"]
    assert res.model_file.read_bytes() != plain.model_file.read_bytes()   # the importance matrix was used
    r = gguf.GGUFReader(res.model_file)
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the tokenizer metadata survives
    assert sorted(p.name for p in res.out_dir.iterdir()) == ["EXPORT.json", "Modelfile", res.model_file.name]
    ids = chat_ids(merged.tokenizer, PROMPTS[0], "The apple is red.")
    want, got = hf_logits(merged.model, ids), llama_logits(res.model_file, ids)
    assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.97


def test_adapter_only_gguf_lora_equals_the_merged_model(tiny_run, merged, f16, tmp_path):
    from loraforge.export.pipeline import export_gguf

    res = export_gguf(tiny_run, tmp_path / "ad", quant="f16", adapter_only=True)
    kv = {k: f.contents() for k, f in gguf.GGUFReader(res.adapter_file).fields.items()}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == 8.0
    assert "ADAPTER ./" in res.modelfile.read_text()
    ids = chat_ids(merged.tokenizer, PROMPTS[1], "Snow is white.")
    plain = llama_logits(res.model_file, ids)
    with_lora = llama_logits(res.model_file, ids, lora=res.adapter_file)
    merged_f16 = llama_logits(f16.model_file, ids)
    scale = np.abs(merged_f16).max()
    assert np.abs(plain - merged_f16).max() > 0.05 * scale              # the adapter matters in llama.cpp
    assert np.abs(with_lora - merged_f16).max() < 0.01 * scale
    assert_same_top1(with_lora, merged_f16, tie=2 * np.abs(with_lora - merged_f16).max(), what="adapter gguf")


def test_rslora_adapter_scale_is_folded(tiny_model, tmp_path):
    import json

    from loraforge.export.merge import merged_model
    from loraforge.export.pipeline import export_gguf

    run = train_tiny_run(tiny_model, tmp_path / "rs")
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_rslora"] = True                     # scale alpha/sqrt(r) = 4 instead of alpha/r = 2
    cfg_path.write_text(json.dumps(cfg))
    res = export_gguf(run, tmp_path / "out", quant="f16", adapter_only=True)
    m = merged_model(run)
    ids = chat_ids(m.tokenizer, PROMPTS[0], "Red.")
    want, got = hf_logits(m.model, ids), llama_logits(res.model_file, ids, lora=res.adapter_file)
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()


def test_generation_stops_at_the_end_of_turn_token(f16, merged):
    from llama_cpp import Llama

    llm = Llama(model_path=str(f16.model_file), n_ctx=128, verbose=False, n_threads=2, seed=0)
    im_end = merged.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = llm.create_chat_completion([{"role": "user", "content": PROMPTS[0]}], max_tokens=20,
                                     temperature=0.0, logit_bias={im_end: 100.0})   # force the end of turn
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["message"]["content"] == ""
    free = llm.create_chat_completion([{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0.0,
                                      logit_bias={im_end: -100.0})
    assert free["choices"][0]["finish_reason"] == "length"                   # the untrained tiny model rambles


def test_cli_export_and_errors(tiny_run, other_base, tiny_model, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", "gguf", str(tiny_run), "--quant", "q8_0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ollama create" in text and (out / "Modelfile").is_file() and (out / f"{tiny_run.name}-q8_0.gguf").is_file()
    assert main(["export", "gguf", str(tiny_run), "--quant", "q8_0", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    assert main(["export", "gguf", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "gguf", str(tiny_run), "--quant", "q3", "--out", str(tmp_path / "o2")]) == 2
    assert "q4_k_m" in capsys.readouterr().err
    for extra in ([], ["--adapter-only"]):
        code = main(["export", "gguf", str(tiny_run), "--base", str(other_base), "--out", str(tmp_path / "o3"),
                     "--overwrite", "--quant", "f16", *extra])
        err = capsys.readouterr().err
        assert code == 2 and "trained for another base model" in err and "Traceback" not in err

    dora = train_tiny_run(tiny_model, tmp_path / "dora", adapter="dora")
    with pytest.raises(LoraforgeError, match="DoRA"):
        from loraforge.export.pipeline import export_gguf

        export_gguf(dora, tmp_path / "o4", quant="f16", adapter_only=True)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("kind,extra", [("qwen2", {"tie": False}), ("qwen3", {"head_dim": 32}),
                                        ("llama", {"rope_parameters": LLAMA3_ROPE}),
                                        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                       "rope_theta": 10000.0}})])
def test_other_llama_family_layouts_match_transformers(kind, extra, tmp_path):
    """Qwen2 (q/k/v biases, untied head, no permutation), Qwen3 (q/k norms, head_dim != hidden/heads) and
    Llama 3.1-style and linear rope scaling give transformers' logits in llama.cpp, over 100 positions."""
    from export_helpers import tiny

    from loraforge.export.gguf import write_model_gguf

    model, tok = tiny(kind, **extra)
    path = write_model_gguf(model, tok, tmp_path / "m.gguf", "f32")
    ids = [(7 * i + 3) % len(tok) for i in range(100)]
    want, got = hf_logits(model, ids), llama_logits(path, ids)
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.97


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizers_tokenize_like_transformers(pre, tmp_path):
    """Tokenizers with the SmolLM, Llama 3 and Qwen2 pre-tokenizers: llama.cpp splits text as transformers."""
    from conftest import CHATML, SPECIALS, corpus
    from export_helpers import tiny
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from loraforge.export.gguf import write_model_gguf
    from loraforge.export.vocab import LLAMA3_REGEX, QWEN2_REGEX

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre == "smollm")
    first = pre_tokenizers.Digits(individual_digits=True) if pre == "smollm" else \
        pre_tokenizers.Split(Regex(LLAMA3_REGEX if pre == "llama-bpe" else QWEN2_REGEX), behavior="isolated")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([first, byte_level])
    raw.decoder = decoders.ByteLevel()
    text = corpus() + ["In 2024 we sold 12,345 units (+3.5%)!", "  indented\n\n\tcode() {x}", "Café déjà vu I'VE"]
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    model, _ = tiny("llama")
    model.resize_token_embeddings(len(tok))
    path = write_model_gguf(model, tok, tmp_path / "m.gguf", "f16")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for s in text[-3:] + ["What colour is the plum? The plum is purple.  Really?!  123456789 it's 'quoted'"]:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok(s, add_special_tokens=False)["input_ids"], s
