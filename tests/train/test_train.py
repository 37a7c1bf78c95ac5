"""The training loop on a tiny model: loss falls, artefacts load in PEFT with the same logits, the
loss-token-only head equals the plain forward, and accumulation weighs every token the same."""

import json

import pytest
import torch

from conftest import tiny_config
from loraforge.config import build_config
from loraforge.data.batching import collate
from loraforge.data.formats import read_examples
from loraforge.data.templates import tokenize_all
from loraforge.errors import LoraforgeError
from loraforge.model.adapters import attach_adapter
from loraforge.model.load import load_base
from loraforge.train.loop import loss_sum, split_model
from loraforge.train.run import run_training


def test_tiny_run_learns_and_writes_artefacts(tiny_model, chat_file, tmp_path):
    cfg = build_config(tiny_config(tiny_model, chat_file, tmp_path / "run", epochs=4, learning_rate=1e-2))
    res = run_training(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert any("val_loss" in r for r in rows) and res.summary["final_val_loss"] is not None
    for name in ("config.yaml", "data_report.json", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (tmp_path / "run" / name).is_file(), name
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_examples"] + report["validation_examples"] == 48 and report["validation_examples"] == 5


def test_peft_loads_adapter_with_same_logits(tiny_model, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = build_config(tiny_config(tiny_model, chat_file, tmp_path / "run", epochs=1))
    res = run_training(cfg)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    ours = res.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    theirs = reloaded(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    with reloaded.disable_adapter():
        plain = reloaded(input_ids=ids).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the adapter changed something


@pytest.fixture()
def batch_and_model(tiny_model, chat_file):
    cfg = build_config(tiny_config(tiny_model, chat_file, "unused"))
    model, tok, _ = load_base(str(tiny_model))
    items, _ = tokenize_all(tok, read_examples(chat_file), 64)
    torch.manual_seed(0)
    model = attach_adapter(model, cfg.lora)
    for n, p in model.named_parameters():  # make lora_B non-zero so the adapter matters
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    return model, items, tok.pad_token_id


def test_loss_token_head_equals_plain_forward(batch_and_model):
    model, items, pad = batch_and_model
    batch = collate(items[:6], pad)
    fast, n = loss_sum(model, batch, split_model(model))
    plain_sum, n2 = loss_sum(model, batch, None)
    hf = model(**batch).loss  # transformers' own mean over label tokens
    assert n == n2
    assert fast.item() == pytest.approx(plain_sum.item(), rel=1e-5)
    assert (fast / n).item() == pytest.approx(hf.item(), rel=1e-5)


def test_accumulation_weighs_every_token_equally(batch_and_model):
    """Gradients of one batch of 4 == two micro-batches of 2 normalised by the step's token count."""
    model, items, pad = batch_and_model
    params = [p for p in model.parameters() if p.requires_grad]
    whole = collate(items[:4], pad)
    s, n = loss_sum(model, whole, split_model(model))
    (s / n).backward()
    g_whole = [p.grad.clone() for p in params]
    model.zero_grad()
    halves = [collate(items[:2], pad), collate(items[2:4], pad)]
    total = sum(int((h["labels"][:, 1:] != -100).sum()) for h in halves)
    assert total == n
    for h in halves:
        s, _ = loss_sum(model, h, split_model(model))
        (s / total).backward()
    for a, p in zip(g_whole, params):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4)


def test_existing_run_dir_is_never_overwritten(tiny_model, chat_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    cfg = build_config(tiny_config(tiny_model, chat_file, out, max_steps=1))
    with pytest.raises(LoraforgeError, match="already exists"):
        run_training(cfg)
    assert (out / "precious.txt").read_text() == "keep me"
    run_training(cfg, overwrite=True)
    assert not (out / "precious.txt").exists()


def test_target_modules_checked_against_the_model(tiny_model, chat_file, tmp_path):
    tree = tiny_config(tiny_model, chat_file, tmp_path / "run")
    tree["lora"]["target_modules"] = ["q_proj", "c_attn"]
    with pytest.raises(LoraforgeError, match=r"\['c_attn'\] are not linear layers"):
        run_training(build_config(tree))


def test_dora_trains(tiny_model, chat_file, tmp_path):
    tree = tiny_config(tiny_model, chat_file, tmp_path / "run", max_steps=2)
    tree["lora"]["adapter"] = "dora"
    res = run_training(build_config(tree))
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and res.summary["steps"] == 2
