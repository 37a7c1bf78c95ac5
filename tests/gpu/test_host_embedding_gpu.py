"""On a CUDA device: model.host_embedding moves an untied NF4 model's input table off the GPU (allocated memory
drops by its size) and the fast path's loss and LoRA gradients stay those of the table on the GPU, whether the
rows come from the loop's host copy of the ids or from the device ids."""

import pytest
import torch

from loraforge.model.fast import FastLlama
from loraforge.model.host_embedding import HostEmbedding, move_embedding_to_host
from loraforge.train.loop import to_device
from test_fast_gpu import _batch, _grads, _small_llama, rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_host_table_frees_its_gpu_memory_and_keeps_loss_and_grads():
    model = _small_llama(quantize=True)     # LlamaConfig's default: untied head
    host_batch = {k: v.cpu() for k, v in _batch().items()}
    batch = to_device(host_batch, "cuda")
    torch.cuda.synchronize()
    assert batch["host_input_ids"].device.type == "cpu" and batch["host_input_ids"].is_pinned()
    ref_loss, ref = _grads(model, FastLlama(model, dtype=torch.bfloat16, checkpointing=True), batch)
    table = model.get_base_model().get_input_embeddings().weight
    size = table.numel() * table.element_size()
    before = torch.cuda.memory_allocated()
    host = move_embedding_to_host(model)
    del table
    assert isinstance(host, HostEmbedding) and host.table.device.type == "cpu"
    assert before - torch.cuda.memory_allocated() == pytest.approx(size, rel=0.01)
    fast = FastLlama(model, dtype=torch.bfloat16, checkpointing=True)
    for b in (batch, {k: v for k, v in batch.items() if k != "host_input_ids"}):
        loss, grads = _grads(model, fast, b)
        assert loss == pytest.approx(ref_loss, rel=1e-3)
        assert max(rel(grads[k], ref[k]) for k in ref) < 1e-2
