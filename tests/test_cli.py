"""The command line: help for every subcommand, and user errors as one message with exit code 2."""

import json
import os

import yaml

from conftest import tiny_config, write_jsonl
from loraforge.cli import main

SUBCOMMANDS = ["train", "generate", "chat", "quickstart", "plan", "data", "eval", "merge", "export", "serve", "tune"]


def test_help_lists_and_explains_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    for name in SUBCOMMANDS:
        assert main([name, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out


def _train(tmp_path, tree, capsys, *extra):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    code = main(["train", str(cfg), *extra])
    return code, capsys.readouterr().err


def test_missing_data_file(tiny_model, tmp_path, capsys):
    code, err = _train(tmp_path, tiny_config(tiny_model, tmp_path / "nope.jsonl", tmp_path / "run"), capsys)
    assert code == 2 and "nope.jsonl: data file not found" in err and "Traceback" not in err


def test_empty_dataset(tiny_model, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    code, err = _train(tmp_path, tiny_config(tiny_model, data, tmp_path / "run"), capsys)
    assert code == 2 and "has no records" in err


def test_all_examples_too_long(tiny_model, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "apple " * 100}, {"role": "assistant", "content": "red"}]}] * 4
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    code, err = _train(tmp_path, tiny_config(tiny_model, data, tmp_path / "run"), capsys)
    assert code == 2 and "longer than max_seq_length=64" in err and "Fix: raise data.max_seq_length" in err


def test_config_error_names_key(tiny_model, chat_file, tmp_path, capsys):
    code, err = _train(tmp_path, tiny_config(tiny_model, chat_file, tmp_path / "run"), capsys, "lora.r=0")
    assert code == 2 and "'lora.r'" in err and "greater than or equal to 1" in err


def test_missing_base_model(chat_file, tmp_path, capsys):
    tree = tiny_config(tmp_path / "no-such-model", chat_file, tmp_path / "run")
    code, err = _train(tmp_path, tree, capsys)
    assert code == 2 and "no-such-model" in err


def test_resume_without_run(tiny_model, chat_file, tmp_path, capsys):
    code, err = _train(tmp_path, tiny_config(tiny_model, chat_file, tmp_path / "run"), capsys, "--resume")
    assert code == 2 and "nothing to resume" in err


def test_train_then_generate(tiny_model, chat_file, tmp_path, capsys):
    code, _ = _train(tmp_path, tiny_config(tiny_model, chat_file, tmp_path / "run", max_steps=2), capsys)
    assert code == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    assert main(["generate", str(tmp_path / "run"), "What colour is the sky?", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("> What colour is the sky?\n") and len(out.splitlines()) >= 2


def test_usage_error_exit_code(capsys):
    assert main(["train", "--no-such-flag"]) == 2


def test_allocator_default_respects_the_users_setting(monkeypatch):
    """Expandable segments under the name this torch reads, unless the user set either name."""
    import platform

    from loraforge.cli import allocator_defaults

    for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(k, raising=False)
    allocator_defaults()
    if "microsoft" not in platform.uname().release.lower():
        assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"   # torch 2.13 here
        assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    allocator_defaults()
    assert "PYTORCH_ALLOC_CONF" not in os.environ
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
