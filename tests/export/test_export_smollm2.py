"""The real embedded model (SmolLM2-135M-Instruct) end to end: a two-step run, exported as f16, q8_0 and
q4_k_m GGUF and read by llama.cpp. f16 predicts the same next token as transformers after every prompt;
perplexity of reference answers stays within 1% (q8_0) and 5% (q4_k_m) of f16; the q4_k_m export takes
under 60 s; generation ends at <|im_end|>. About a minute and a half on two CPU cores."""

import numpy as np
import pytest
from conftest import chat_rows, write_jsonl
from export_helpers import LlamaScorer, hf_logits

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")

# Held-out prompts with reference answers (not in the training data nor the imatrix calibration text).
CONVS = [
    ('What is the capital of France?',
     ('The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes, '
      'and it is one of the most visited cities in the world.')),
    ('Give me three tips for sleeping better.',
     ('1. Go to bed and wake up at the same time every day.\n2. Avoid screens and caffeine in the evening.\n'
      '3. Keep your bedroom cool, dark and quiet.')),
    ('Why is the sky blue?',
     ('The sky looks blue because the air scatters short blue wavelengths of sunlight much more than long '
      'red ones, so blue light reaches our eyes from every direction.')),
    ('Write a short greeting for a birthday card.',
     ('Happy birthday! Wishing you a wonderful year full of joy, laughter and good friends. Enjoy your '
      'special day!')),
    ('How do I make a cup of tea?',
     ('Boil fresh water, pour it over a tea bag in a cup, let it steep for three to five minutes, then '
      'remove the bag and add milk or sugar if you like.')),
    ("What does a computer's CPU do?",
     ('The CPU, or central processing unit, carries out the instructions of computer programs. It performs '
      'arithmetic, logic and control operations, and it coordinates the other parts of the computer.')),
    ('Explain photosynthesis in simple terms.',
     ('Photosynthesis is how plants make their own food. They take in sunlight, water and carbon dioxide, '
      'and turn them into sugar and oxygen. The oxygen is released into the air.')),
    ('What should I pack for a weekend hiking trip?',
     ('Pack sturdy boots, a rain jacket, warm layers, a map, plenty of water, snacks, a first aid kit, a '
      'headlamp and a small backpack to carry it all.')),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from loraforge.config import build_config
    from loraforge.export.merge import merged_model
    from loraforge.export.pipeline import export_gguf
    from loraforge.train.run import run_training

    root = tmp_path_factory.mktemp("smollm2")
    data = write_jsonl(root / "train.jsonl", chat_rows(16))
    cfg = build_config({"base_model": "smollm2-135m-instruct", "output_dir": str(root / "run"),
                        "data": {"train": str(data), "max_seq_length": 64},
                        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                        "train": {"max_steps": 2, "batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3,
                                  "precision": "fp32", "eval_every": 100, "save_every": 100}})
    run = run_training(cfg).run_dir
    files = {q: export_gguf(run, root / q, quant=q) for q in ("q4_k_m", "f16", "q8_0")}
    return merged_model(run), files


def split(tok, prompt, answer):
    pre = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    return tok(full, add_special_tokens=False)["input_ids"], len(tok(pre, add_special_tokens=False)["input_ids"])


def answer_nll(logits, ids, n_prompt):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return [-logp[i - 1, ids[i]] for i in range(n_prompt, len(ids))]


def test_gguf_exports_agree_with_transformers(exported):
    merged, files = exported
    assert files["q4_k_m"].seconds < 60, files["q4_k_m"].timings
    tok = merged.tokenizer
    scorers = {q: LlamaScorer(r.model_file) for q, r in files.items()}
    for text in ("In 2024 we sold 12,345 units (+3.5%)!", "Café déjà vu\n\n  indented\tcode()", CONVS[1][1]):
        assert scorers["f16"].llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tok(text, add_special_tokens=False)["input_ids"]
    nll = {q: [] for q in ("hf", *files)}
    for prompt, answer in CONVS:
        ids, n = split(tok, prompt, answer)
        want = hf_logits(merged.model, ids)
        nll["hf"] += answer_nll(want, ids, n)
        for q, scorer in scorers.items():
            got = scorer.logits(ids)
            nll[q] += answer_nll(got, ids, n)
            if q == "f16":
                assert got[n - 1].argmax() == want[n - 1].argmax(), prompt    # the next token after the prompt
                top2 = np.sort(want, -1)[:, -2:]
                clear = top2[:, 1] - top2[:, 0] > 0.05                         # positions without a near tie
                assert np.array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), prompt
    ppl = {q: float(np.exp(np.mean(v))) for q, v in nll.items()}
    print("answer perplexity:", {q: round(p, 4) for q, p in ppl.items()})
    assert abs(ppl["f16"] / ppl["hf"] - 1) < 0.002
    # q8_0 (weights and, in llama.cpp's dot products, activations in 8 bits) moves with the last bits of the
    # CPU-trained adapter: two CI runs whose losses agreed to 1e-7 gave 0.16% and 1.28% (AVX2 build, 292 tokens)
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.025
    assert abs(ppl["q4_k_m"] / ppl["f16"] - 1) < 0.05
    for s in scorers.values():
        s.close()


def test_generation_stops_at_im_end(exported):
    from llama_cpp import Llama

    merged, files = exported
    text = files["q4_k_m"].modelfile.read_text()
    assert 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" in text and "<|im_start|>{{ .Role }}" in text
    im_end = merged.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for q in ("f16", "q4_k_m"):
        llm = Llama(model_path=str(files[q].model_file), n_ctx=512, verbose=False, n_threads=2, seed=0)
        assert llm.token_eos() == im_end
        for prompt, _ in CONVS[:3]:
            # greedy, with Ollama's default repeat penalty (1.1): without it the 4-bit 135M model can loop on
            # one sentence until max_tokens (seen for the sky prompt in an AVX2 build of llama.cpp)
            out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=256, temperature=0.0,
                                             repeat_penalty=1.1)
            choice = out["choices"][0]
            assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] < 256, (q, prompt)
            assert choice["message"]["content"].strip() and "<|im" not in choice["message"]["content"]
        llm.close()
