"""`loraforge merge`: the merged 16-bit model gives the adapter's logits (within bf16 rounding), its
weights are bf16(W + scale * B @ A) computed in float32, the folder carries tokenizer, chat template and
a generation config ending at <|im_end|>; bad input is one clear error with exit code 2."""

import json

import pytest
import torch

from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.export.merge import merge_run, merged_model


def test_merged_logits_equal_adapter_logits(tiny_model, tiny_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge_run(tiny_run, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tiny_run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 200, 300, 2]])
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        with peft.disable_adapter():
            plain = peft(input_ids=ids).logits
    scale = want.abs().max()
    assert (want - plain).abs().max() > 0.05 * scale          # the adapter matters ...
    assert (got - want).abs().max() < 0.02 * scale            # ... and survives the merge within bf16 rounding
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_merged_weights_are_one_bf16_rounding_of_the_float32_merge(tiny_model, tiny_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = merge_run(tiny_run, tmp_path / "merged")
    saved = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    adapter = load_file(tiny_run / "adapter" / "adapter_model.safetensors")
    cfg = json.loads((tiny_run / "adapter" / "adapter_config.json").read_text())
    name = "model.layers.1.self_attn.q_proj"
    a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
    expect = (base[f"{name}.weight"] + cfg["lora_alpha"] / cfg["r"] * b @ a).to(torch.bfloat16)
    assert torch.equal(saved[f"{name}.weight"], expect)


def test_merged_folder_is_complete(tiny_run, tmp_path):
    from transformers import AutoTokenizer

    out = merge_run(tiny_run, tmp_path / "merged", dtype="float16")
    tok = AutoTokenizer.from_pretrained(out)
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") == (eos if isinstance(eos, int) else eos[0])
    assert "<|im_start|>" in tok.chat_template
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    info = json.loads((out / "MERGE.json").read_text())
    assert info["dtype"] == "float16" and info["run_config"]["lora"]["r"] == 4
    with pytest.raises(LoraforgeError, match="already exists"):
        merge_run(tiny_run, out)


def test_qlora_run_merges_into_the_unquantised_base(tiny_run, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "qlora-run"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["quantization"] = "nf4"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = merged_model(run)
    assert {p.dtype for p in m.model.parameters()} == {torch.float32}
    assert not any("Linear4bit" in type(mod).__name__ for mod in m.model.modules())
    info = json.loads((merge_run(run, tmp_path / "merged") / "MERGE.json").read_text())
    assert info["quantization_in_training"] == "nf4" and info["merged_in"].startswith("float32")


def test_dora_run_merges(tiny_model, tmp_path):
    from conftest import train_tiny_run
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train_tiny_run(tiny_model, tmp_path / "dora", adapter="dora")
    out = merge_run(run, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99]])
    with torch.no_grad():
        want, got = peft(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_cli_merge_and_its_errors(tiny_run, other_base, tmp_path, capsys):
    assert main(["merge", str(tiny_run), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    capsys.readouterr()

    assert main(["merge", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err

    (tmp_path / "empty-run").mkdir()
    assert main(["merge", str(tmp_path / "empty-run")]) == 2
    assert "no adapter here" in capsys.readouterr().err

    assert main(["merge", str(tiny_run), "--base", str(other_base), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "trained for another base model" in err and "hidden size 32" in err and "Traceback" not in err
