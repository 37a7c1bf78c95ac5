"""`loraforge plan` end to end: tables, --json, configs, price overrides, exit code 2 on bad input, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraforge.cli import main


def run_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_table_output(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--method", "qlora", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    for text in ("Llama-3.1-8B", "Peak GPU memory", "quantisation constants", "RTX 3060 12GB", "H200 141GB",
                 "Cheapest card that fits", "late 2026", "adamw_8bit"):
        assert text in out
    assert "input" in out and "host memory" in out   # model.host_embedding auto, said in the weights' note
    assert main(["plan", "--model", "llama-3.2-1b", "--method", "qlora"]) == 0
    assert "host memory" not in capsys.readouterr().out   # a tied table stays on the GPU


def test_json_output(capsys):
    plan = run_json(capsys, "--model", "llama-3.1-8b", "--method", "full", "--batch", "1", "--seq", "4096")
    assert plan["setup"]["method"] == "full" and plan["model"]["params"] > 8e9
    assert plan["memory_gib"]["total"] > 80
    rows = {r["gpu"]: r for r in plan["gpus"]}
    assert not rows["H100 80GB"]["fits"] and rows["H100 80GB"]["max_batch"] == 0
    assert plan["suggestions"] and plan["target_gpu"] == "H200 141GB"  # fits nowhere: fixes for the largest


def test_suggestions_for_the_named_gpu(capsys):
    assert main(["plan", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--gpu", "3060"]) == 0
    out = capsys.readouterr().out
    assert "Does not fit on RTX 3060 12GB" in out and "QLoRA" in out


def test_config_file_maps_to_the_setup(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "x" * 387}) + "\n" for _ in range(50)))  # 400 bytes a line
    config = tmp_path / "run.yaml"
    config.write_text(f"""
base_model: Qwen/Qwen2.5-0.5B-Instruct
model: {{quantization: nf4, gradient_checkpointing: true}}
data: {{train: {data}, max_seq_length: 1024}}
lora: {{r: 32, target_modules: [q_proj, v_proj]}}
train: {{batch_size: 4, grad_accum: 2, optimizer: adamw_8bit, epochs: 2}}
""")
    plan = run_json(capsys, str(config))
    setup = plan["setup"]
    assert plan["model"]["name"] == "Qwen2.5-0.5B"
    assert (setup["method"], setup["rank"], setup["targets"], setup["seq"], setup["batch"]) == \
        ("qlora", 32, ["q_proj", "v_proj"], 1024, 4)
    assert setup["gradient_checkpointing"] and not setup["packing"] and setup["optimizer"] == "adamw_8bit"
    data_size = {k: plan["data"][k] for k in ("examples", "epochs", "avg_tokens", "assumed")}
    assert data_size == {"examples": 50, "epochs": 2.0, "avg_tokens": 100, "assumed": False}
    flagged = run_json(capsys, str(config), "--method", "lora", "--seq", "512", "--targets", "all-linear",
                       "--no-gradient-checkpointing", "--examples", "10")
    assert flagged["setup"]["method"] == "lora" and len(flagged["setup"]["targets"]) == 7
    assert flagged["setup"]["seq"] == 512 and not flagged["setup"]["gradient_checkpointing"]
    assert flagged["data"]["examples"] == 10


def test_local_config_json_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 600}))
    plan = run_json(capsys, "--model", str(tmp_path), "--rank", "8")
    assert plan["model"]["hidden"] == 64 and all(r["fits"] for r in plan["gpus"])


def test_price_override(tmp_path, capsys):
    prices = tmp_path / "prices.yaml"
    prices.write_text("H100: 10\nRTX 4090 24GB: 0.5\n")
    base = {r["gpu"]: r for r in run_json(capsys, "--model", "qwen3-0.6b")["gpus"]}
    rows = {r["gpu"]: r for r in run_json(capsys, "--model", "qwen3-0.6b", "--prices", str(prices))["gpus"]}
    assert rows["H100 80GB"]["usd_per_hour"] == 10 and rows["RTX 4090 24GB"]["usd_per_hour"] == 0.5
    assert rows["H100 80GB"]["cost_usd"] == pytest.approx(base["H100 80GB"]["hours"] * 10)
    assert rows["L4 24GB"]["usd_per_hour"] == base["L4 24GB"]["usd_per_hour"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "-1"], "batch must be a whole number of at least 1 (got -1)"),
    (["--seq", "0"], "seq must be a whole number of at least 1 (got 0)"),
    (["--model", "llama-3.1-8b", "--rank", "8192"], "larger than Llama-3.1-8B's hidden size 4096"),
    (["--model", "qwen2.5-8b"], "Did you mean Qwen2.5-7B"),
    (["--method", "dora"], "method must be one of full, lora, qlora"),
    (["--gpu", "a100"], "ambiguous: A100 40GB, A100 80GB"),
    (["--gpu", "tpu"], "unknown GPU 'tpu'"),
    (["--examples", "0"], "examples must be a positive whole number"),
    (["--prices", "missing.yaml"], "cannot read the price table"),
])
def test_bad_input_is_one_clear_error(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_plan_imports_no_torch():
    code = ("import sys, time; t = time.perf_counter(); from loraforge.cli import main; "
            "rc = main(['plan', '--model', 'llama-3.1-8b', '--gpu', '3060', '--json']); "
            "sys.stderr.write(f'{time.perf_counter() - t:.3f}'); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["suggestions"]   # (no timing here: the house rule; ~0.5 s on an idle 2-core box)
