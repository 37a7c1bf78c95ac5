"""The Ollama Modelfile: the chat format is recognised by rendering (ChatML with its default system
prompt, Llama 3), stop tokens follow the template, unknown templates leave TEMPLATE out."""

from conftest import make_tokenizer

from loraforge.export.modelfile import FORMATS, PROBES, detect_format, modelfile_text

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def test_chatml_with_its_default_system_prompt():
    tok = make_tokenizer()
    fmt, system = detect_format(tok)
    assert fmt.name == "chatml" and system == "You are a tiny test model."
    for probe in PROBES:  # the Python rendering of the format equals the Jinja template's
        msgs = probe if probe[0]["role"] == "system" else [{"role": "system", "content": system}, *probe]
        assert fmt.render(msgs) == tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    text = modelfile_text("./m.gguf", tok, header="made by a test")
    assert text.startswith("# made by a test\nFROM ./m.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>' in text
    assert 'SYSTEM """You are a tiny test model."""' in text
    assert text.count("PARAMETER stop") == 1 and 'PARAMETER stop "<|im_end|>"' in text


def test_run_system_prompt_and_adapter():
    text = modelfile_text("./base.gguf", make_tokenizer(), system="Be terse.", adapter_file="./lora.gguf")
    assert "ADAPTER ./lora.gguf" in text and 'SYSTEM """Be terse."""' in text


def test_llama3_format():
    tok = make_tokenizer(LLAMA3, LLAMA3_SPECIALS, eos="<|end_of_text|>", bos="<|begin_of_text|>")
    fmt, system = detect_format(tok)
    assert fmt.name == "llama3" and system is None
    text = modelfile_text("./m.gguf", tok)
    assert 'PARAMETER stop "<|eot_id|>"' in text and "SYSTEM" not in text
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text


def test_unknown_template_keeps_the_stop_token():
    odd = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>\n{% endfor %}ASSISTANT:"
    tok = make_tokenizer(odd)
    assert detect_format(tok) == (None, None)
    text = modelfile_text("./m.gguf", tok)
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text and "not recognised" in text
    assert {f.name for f in FORMATS} == {"chatml", "llama3", "mistral"}
