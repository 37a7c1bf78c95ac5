"""RunFiles: a run's config, adapter, tokenizer and base found once from its folder (or from a bare PEFT
adapter folder), the one object eval and export take; mistakes are one LoraforgeError naming the folder."""

import json

import pytest
import yaml

from loraforge.errors import LoraforgeError
from loraforge.train.run_files import RunFiles


def _adapter(folder, base="some/base", weights=True):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 4}))
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    return folder


def _run(tmp_path, base_model="tiny-base", **kw):
    run = tmp_path / "run"
    _adapter(run / "adapter", **kw)
    (run / "config.yaml").write_text(yaml.safe_dump({"base_model": base_model, "data": {"system_prompt": "Hi"}}))
    return run


def test_a_run_folder_names_its_config_adapter_and_base(tmp_path):
    run = _run(tmp_path)
    f = RunFiles.find(run)
    assert (f.run_dir, f.adapter_dir, f.config_path) == (run, run / "adapter", run / "config.yaml")
    assert f.base_model == "tiny-base"                          # the run's config before the adapter's own note
    assert f.adapter_config["r"] == 4 and f.run_config["data"]["system_prompt"] == "Hi"
    assert RunFiles.find(run, base="other").base_model == "other"
    assert RunFiles.of_run(run) == f                            # the same files, however it was found
    assert RunFiles.resolve(f) is f and RunFiles.resolve(f, base="other").base_model == "other"


def test_a_bare_adapter_folder_takes_the_base_from_adapter_config(tmp_path):
    folder = _adapter(tmp_path / "peft", base="hub/model")
    f = RunFiles.find(folder)
    assert (f.adapter_dir, f.base_model, f.run_config, f.config_path) == (folder, "hub/model", {}, None)
    with pytest.raises(LoraforgeError, match="no config.yaml"):
        f.config()


def test_the_tokenizer_comes_from_the_adapter_folder_only_when_saved_there(tmp_path):
    f = RunFiles.find(_run(tmp_path))
    assert f.tokenizer_source("/base") == "/base"
    (f.adapter_dir / "tokenizer_config.json").write_text("{}")
    assert f.tokenizer_source("/base") == str(f.adapter_dir)


def test_mistakes_are_one_error_naming_the_folder(tmp_path):
    with pytest.raises(LoraforgeError, match="does not exist"):
        RunFiles.find(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraforgeError, match="no adapter here"):
        RunFiles.find(tmp_path / "empty")
    with pytest.raises(LoraforgeError, match="not a finished run folder"):
        RunFiles.of_run(tmp_path / "empty")
    with pytest.raises(LoraforgeError, match="no adapter_model.safetensors"):
        RunFiles.find(_adapter(tmp_path / "unsaved", weights=False))
    with pytest.raises(LoraforgeError, match="which base model"):
        RunFiles.find(_adapter(tmp_path / "nobase", base=None))
    # a finished run whose adapter was never written is still a run: eval reports the base and the failed load
    killed = _run(tmp_path / "k", weights=False)
    assert RunFiles.of_run(killed).adapter_dir == killed / "adapter"
