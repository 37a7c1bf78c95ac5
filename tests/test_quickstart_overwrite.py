"""`loraforge quickstart --overwrite` keeps the old run until the new one has trained: a failure on the way
(here the model cannot be loaded) puts the old folder back as it was."""

import pytest

import loraforge.model.load as load
from loraforge.errors import LoraforgeError
from loraforge.quickstart import run_quickstart


def test_a_failed_quickstart_leaves_the_old_run(tmp_path, monkeypatch):
    old = tmp_path / "qs"
    (old / "adapter").mkdir(parents=True)
    (old / "adapter" / "adapter_model.safetensors").write_bytes(b"old weights")
    (old / "summary.json").write_text("{}")

    def broken(*a, **k):
        raise LoraforgeError("no model here")

    monkeypatch.setattr(load, "load_base", broken)
    with pytest.raises(LoraforgeError, match="no model here"):
        run_quickstart(old, overwrite=True)
    assert (old / "adapter" / "adapter_model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in old.iterdir()) == ["adapter", "summary.json"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
