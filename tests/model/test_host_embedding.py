"""model.host_embedding: a frozen, untied input embedding kept in host memory gives the same loss and LoRA
gradients as the table on the device, with or without the batch's host copy of the ids; it is chosen only
where it applies (untied, frozen, a GPU, a QLoRA model's large table under auto)."""

import pytest
import torch

from loraforge.model.fast import FastLlama
from loraforge.model.host_embedding import HostEmbedding, move_embedding_to_host, why_not_host
from test_fast_path import _adapted, _batch, _close, _loss_and_grads


def test_lookup_matches_the_embedding_it_replaces():
    emb = torch.nn.Embedding(50, 8, padding_idx=0)
    host = HostEmbedding(emb.weight, emb.padding_idx)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(host(ids), emb(ids))
    assert torch.equal(host(ids, host_ids=ids.clone()), emb(ids))
    assert host.weight.shape == (50, 8) and not isinstance(host.table, torch.nn.Parameter)
    assert "on the host" in repr(host)


@pytest.mark.parametrize("host_ids", [False, True], ids=["ids-from-device", "host-copy"])
def test_fast_path_loss_and_grads_are_unchanged(host_ids):
    model = _adapted("qwen2")   # untied head
    batch = _batch()
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, FastLlama(model, dtype=torch.float32), batch)
    host = move_embedding_to_host(model)
    assert model.get_base_model().get_input_embeddings() is host
    assert not any("embed_tokens" in k for k, _ in model.named_parameters())   # gone from the module tree
    if host_ids:
        batch = {**batch, "host_input_ids": batch["input_ids"].clone()}
    loss, n, grads = _loss_and_grads(model, FastLlama(model, dtype=torch.float32), batch)
    assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-6)
    for k in grads:
        _close(grads[k], ref_grads[k], 1e-6, k)
    # transformers' own forward (generate, the plain path) reads the same rows
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"][:1, :5]).logits
    assert out.shape == (1, 5, 97) and torch.isfinite(out).all()


def test_applies_only_to_an_untied_frozen_table_on_a_gpu():
    untied, tied = _adapted("qwen2"), _adapted("llama")
    assert why_not_host(untied, "on", "cuda", quantized=False, sharded=False) is None
    assert "tied" in why_not_host(tied, "on", "cuda", quantized=False, sharded=False)
    assert "GPU" in why_not_host(untied, "on", "cpu", quantized=False, sharded=False)
    assert "FSDP" in why_not_host(untied, "on", "cuda", quantized=False, sharded=True)
    assert why_not_host(untied, "off", "cuda", quantized=True, sharded=False)
    # auto: QLoRA tables of 256 MiB or more (this one is 97 x 48 floats)
    assert "256 MiB" in why_not_host(untied, "auto", "cuda", quantized=True, sharded=False)
    untied.get_base_model().get_input_embeddings().weight.requires_grad_(True)
    assert "trained" in why_not_host(untied, "on", "cuda", quantized=False, sharded=False)


def test_to_device_on_the_cpu_adds_no_host_copy_of_the_ids():
    from loraforge.train.loop import to_device

    batch = _batch()
    assert "host_input_ids" not in to_device(batch, "cpu")
    assert to_device(batch, "cpu")["loss_index"].numel() == int((batch["labels"][:, 1:] != -100).sum())
