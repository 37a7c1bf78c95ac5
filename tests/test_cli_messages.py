"""Messages that say what happened: a prompt over the model's context is refused before decoding, chat says
how to quit, a one-step run says "1 step", a request without a model names the missing field, and training
prints no third-party FutureWarnings."""

import warnings

import yaml

from conftest import tiny_config
from loraforge.cli import main


def test_generate_over_the_context_is_a_clear_error(tiny_model, capsys):
    code = main(["generate", str(tiny_model), "apple " * 300, "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "prompt 1 is" in err and "more than the model's context of 256 tokens" in err
    code = main(["generate", str(tiny_model), "What colour is the sky?", "--max-new-tokens", "250"])
    assert code == 2 and "--max-new-tokens 250" in capsys.readouterr().err


def test_chat_says_how_to_quit(tiny_model, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    assert main(["chat", str(tiny_model)]) == 0
    assert "an empty line or Ctrl-D ends the chat" in capsys.readouterr().err


def test_one_step_run_says_one_step_and_no_future_warnings(tiny_model, chat_file, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model, chat_file, tmp_path / "run", max_steps=1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert ", 1 step\n" in err and "1 steps" not in err
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_request_without_model(tiny_model):
    import pytest

    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from loraforge.serve.server import build_app, load_registry

    app = build_app(load_registry(str(tiny_model), {}, device="cpu", name="tiny"))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "names no model" in r.json()["error"]["message"]
    assert "'None'" not in r.json()["error"]["message"]
