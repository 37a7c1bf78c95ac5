"""On a CUDA device: the fast path's per-sequence log-probs (bf16, liger kernels in the forward, chunked
per-row cross-entropy at the head) against PEFT's forward, values and LoRA gradients; and a short DPO and
GRPO run through the trainer on the fast path."""

import pytest
import torch

from conftest import tiny_config, write_jsonl
from loraforge.config import LoraSection, build_config
from loraforge.data.batching import collate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fast_sequence_logps_match_peft_in_bf16(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data.preference import Pair, tokenize_preferences
    from loraforge.model.adapters import attach_adapter
    from loraforge.model.fast import FastLlama
    from loraforge.train.logprobs import LogpStep

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.bfloat16).cuda()
    model = attach_adapter(model, LoraSection(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pairs = [Pair([{"role": "user", "content": f"What colour is thing {i}?"}],
                  [{"role": "assistant", "content": "It is red."}],
                  [{"role": "assistant", "content": "It is blue, I think, maybe green."}], f"x:{i}") for i in range(4)]
    items, _ = tokenize_preferences(tok, pairs, 64, 64)
    batch = {k: v.cuda() for k, v in collate([s for it in items for s in it.sides()], tok.pad_token_id).items()}
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing="offload", graphs="off")
    out = []
    for parts in (None, fast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sums, _ = LogpStep(model, parts)(batch)
        (sums * torch.linspace(1, 2, len(sums), device="cuda")).sum().backward()
        out.append((sums.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                            if p.requires_grad}))
    (a, ga), (b, gb) = out
    assert float((a - b).abs().max() / a.abs().max()) < 2e-2
    for n in ga:
        assert float((ga[n] - gb[n]).norm() / ga[n].norm().clamp_min(1e-12)) < 5e-2, n


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_preference_and_grpo_runs_on_the_fast_path(tiny_model, tmp_path, objective):
    from loraforge.train.run import run_training

    if objective == "dpo":
        rows = [{"prompt": f"What colour is thing {i}?", "chosen": "Red.", "rejected": "Blue."} for i in range(24)]
    else:
        rows = [{"prompt": f"What colour is thing {i}?", "answer": "red"} for i in range(24)]
    tree = tiny_config(tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "run", epochs=1,
                       precision="bf16")
    tree.update(objective=objective, model={"fast_path": "on", "gradient_checkpointing": "offload"},
                grpo={"rewards": ["normalized_match"], "group_size": 4, "max_new_tokens": 4})
    res = run_training(build_config(tree))
    assert res.summary["fast_path"] and res.summary["steps"] >= 2
    assert ("preference" if objective == "dpo" else "grpo") in res.summary
