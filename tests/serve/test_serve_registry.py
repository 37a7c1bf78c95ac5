"""The adapter registry on its own: load, unload down to the bare base, refusals that leave no trace."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_adapter  # noqa: E402

from loraforge.errors import LoraforgeError


def test_unloading_the_last_adapter_restores_the_bare_base(tiny_model, tmp_path):
    import torch
    from peft import PeftModel

    from loraforge.serve.server import load_registry

    reg = load_registry(str(tiny_model), {}, device="cpu", name="tiny")
    ids = torch.tensor([[5, 17, 42, 99]])
    plain = reg.model(input_ids=ids).logits
    reg.load("a", make_adapter(tiny_model, tmp_path / "a", 1))
    assert isinstance(reg.model, PeftModel) and reg.names() == ["tiny", "a"]
    assert not torch.allclose(reg.model(input_ids=ids).logits, plain)
    with pytest.raises(LoraforgeError, match="hidden|does not fit"):
        reg.load("x", make_adapter(tiny_model, tmp_path / "x", 2, hidden=32))
    with pytest.raises(LoraforgeError, match="cannot be an adapter name"):
        reg.load("tiny", tmp_path / "a")
    reg.unload("a")
    assert not isinstance(reg.model, PeftModel) and reg.names() == ["tiny"]
    assert torch.allclose(reg.model(input_ids=ids).logits, plain)
    with pytest.raises(LoraforgeError, match="no adapter named"):
        reg.unload("a")


def test_refusals_are_typed(tmp_path):
    from loraforge.serve.errors import AdapterAlreadyLoaded, AdapterLoadFailed, AdapterNotFound
    from loraforge.serve.registry import Registry

    reg = Registry(None, None, "tiny")  # every refusal below happens before the model is touched
    with pytest.raises(AdapterLoadFailed, match="cannot be an adapter name"):
        reg.load("a/b", tmp_path)
    with pytest.raises(AdapterLoadFailed, match="adapter_config.json"):
        reg.load("a", tmp_path)
    reg.adapters["a"] = str(tmp_path)
    with pytest.raises(AdapterAlreadyLoaded, match="already loaded"):
        reg.load("a", tmp_path)
    with pytest.raises(AdapterNotFound, match="no adapter named 'b'"):
        reg.unload("b")
    assert issubclass(AdapterAlreadyLoaded, LoraforgeError) and issubclass(AdapterNotFound, LoraforgeError)
