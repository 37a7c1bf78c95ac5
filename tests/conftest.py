"""Shared fixtures: a tiny random Llama model with a real (locally trained) BPE tokenizer and a ChatML
chat template, saved as a Hugging Face folder, plus small chat datasets. A training step on it takes
milliseconds, so the whole loop can be tested on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """bench/NAME.py as a module (bench/ on sys.path first, for the scripts' imports of each other)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
THINGS = ["apple", "sky", "grass", "banana", "coal", "snow", "plum", "carrot"]


def corpus() -> list[str]:
    lines = []
    for c, t in zip(COLORS, THINGS):
        lines += [f"What colour is the {t}? The {t} is {c}.", f"Tell me about {t} and {c} things."]
    lines += ["You are a tiny test model.", "system user assistant", "Answer with one word only please."]
    return lines * 4


def make_tokenizer(template: str = CHATML, specials=SPECIALS, eos="<|im_end|>", bos=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=specials[0],
                                   bos_token=bos, additional_special_tokens=[s for s in specials if s not in (eos,)])
    fast.chat_template = template
    return fast


def make_tiny_model(path: Path, seed: int = 0, tied: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, initializer_range=0.2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def chat_rows(n: int = 48) -> list[dict]:
    rows = []
    for i in range(n):
        c, t = COLORS[i % len(COLORS)], THINGS[i % len(THINGS)]
        rows.append({"messages": [{"role": "user", "content": f"What colour is the {t}?"},
                                  {"role": "assistant", "content": f"The {t} is {c}."}]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", chat_rows())


@pytest.fixture()
def triton_interpreter(monkeypatch):
    """Run one of loraforge's Triton kernel modules (model.fast.kernels, model.fast.nf4: each builds its
    kernel in a cached `_kernel()`) under Triton's CPU interpreter: call it with the module."""
    used = []

    def interpret(module):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        module._kernel.cache_clear()
        used.append(module)
        return module

    yield interpret
    for module in used:  # the next user compiles the kernel again, without the interpreter
        module._kernel.cache_clear()


def tiny_config(model_dir: Path, data: Path, out: Path, **train) -> dict:
    """A config tree for a fast deterministic run on the tiny model."""
    t = {"epochs": 2, "learning_rate": 5e-3, "batch_size": 4, "grad_accum": 2, "eval_every": 3, "save_every": 3,
         "precision": "fp32", "warmup_ratio": 0.1}
    t.update(train)
    return {"base_model": str(model_dir), "output_dir": str(out), "data": {"train": str(data), "max_seq_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "train": t}


def train_tiny_run(model_dir: Path, out: Path, **lora) -> Path:
    from loraforge.config import build_config
    from loraforge.train.run import run_training

    data = write_jsonl(out.parent / f"{out.name}-train.jsonl", chat_rows())
    tree = tiny_config(model_dir, data, out, epochs=1, learning_rate=3e-2)
    tree["lora"].update(lora)
    run_training(build_config(tree))
    return out


def copy_run(run: Path, dest: Path, **eval_fields) -> Path:
    """A copy of a finished run folder (without checkpoints and earlier evals) whose config carries extra
    eval.* fields."""
    import shutil

    import yaml

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["eval"].update(eval_fields)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    """A finished run folder on the tiny model whose adapter changes the logits (trained once)."""
    return train_tiny_run(tiny_model, tmp_path_factory.mktemp("export-run") / "run")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """A tiny Llama with hidden size 32, which the tiny run's adapter does not fit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("other-base"))
    cfg = LlamaConfig.from_pretrained(path)
    cfg.hidden_size, cfg.intermediate_size = 32, 64
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def metrics_rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged step."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(got: list[dict], ref: list[dict], rel: float = 1e-5) -> None:
    """Two runs logged the same steps with the same train and validation losses (to `rel`)."""
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=rel)
    assert [r.get("val_loss", -1) for r in got] == pytest.approx([r.get("val_loss", -1) for r in ref], rel=rel)
