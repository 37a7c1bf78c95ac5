"""Log-probabilities of completion tokens: the policy's (with gradients) and the reference's (the same
model with its adapter switched off, no second copy of the weights).

The plain path runs the decoder and applies the head at loss positions only, as train.loop.loss_sum
does; the fast Llama path (model.fast.FastLlama.token_logps) does the same through its fused forward.
Both return the log-prob of every loss token in row order with the row it belongs to; sums per row
follow. The reference always runs PEFT's own forward under `disable_adapter()` (the fast path reads
the adapter's weights directly, so it cannot switch them off), without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraforge.data.templates import IGNORE_INDEX
from loraforge.train.loop import model_inputs, split_model


# logits of at most this many elements at a time on the decoder + head path (the DPO/KTO/GRPO reference): 2,048
# completion tokens of a 128K vocabulary are 1 GiB of bf16 logits and 2 GiB more in fp32 when taken at once.
# It bounds the reference's transient logits. The 8B QLoRA DPO step's peak above SFT, which it was first written
# for, was the policy's (model.fast.ops.linear_cross_entropy_rows: about 3 GiB of one chunk's logits and their
# gradients, in the allocator's history of session 16, bench/results/preference/).
LOGIT_CHUNK = 2 ** 26


def _head_logps(head, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """-cross_entropy of head(hidden) at labels, `chunk` logits (rows x vocab) at a time. Without gradients
    only one chunk's logits are alive; with them, autograd keeps each chunk's as the unchunked call would."""
    rows = max(1, chunk // getattr(head, "out_features", chunk))
    parts = [-F.cross_entropy(head(h).float(), y, reduction="none")
             for h, y in zip(hidden.split(rows), labels.split(rows))]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def token_logps(model, batch: dict, parts=None, chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each loss token (N,) fp32, row index (N,)) for a collated batch (padded or packed rows)."""
    if hasattr(parts, "token_logps"):  # the fast Llama-family path
        return parts.token_logps(batch)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    if parts is None:  # the model's own forward builds every logit
        logits = model(**model_inputs(batch)).logits[:, :-1][keep]
        logp = -F.cross_entropy(logits.float(), labels[keep], reduction="none")
    else:
        decoder, head = parts
        logp = _head_logps(head, decoder(**model_inputs(batch)).last_hidden_state[:, :-1][keep], labels[keep], chunk)
    return logp, keep.nonzero()[:, 0]


def row_sums(logp: torch.Tensor, rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs per row, token count per row)."""
    return logp.new_zeros(n_rows).index_add(0, rows, logp), torch.bincount(rows, minlength=n_rows)


def sequence_logps(model, batch: dict, parts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's loss tokens (B,), their count (B,))."""
    if hasattr(parts, "sequence_logps"):
        return parts.sequence_logps(batch)
    return row_sums(*token_logps(model, batch, parts), batch["input_ids"].shape[0])


@torch.no_grad()
def reference_token_logps(model, batch: dict, chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logps of the base model: the PEFT model with its adapter disabled, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            return token_logps(model, batch, split_model(model), chunk)
    finally:
        model.train(was_training)


class LogpStep(torch.nn.Module):
    """The policy's log-probs as one module's forward, so DDP/FSDP2 hook it (as train.loop.StepModule)."""

    def __init__(self, model, fast=None):
        super().__init__()
        self.model = model
        self.parts = fast or split_model(model)

    def forward(self, batch: dict, per_token: bool = False):
        if per_token:
            return token_logps(self.model, batch, self.parts)
        return sequence_logps(self.model, batch, self.parts)


def wrap_logp_step(model, dist, device: str, fast=None) -> torch.nn.Module:
    """LogpStep, in DDP or FSDP2 under torchrun (train.distributed.wrap); build the optimizer after this."""
    from loraforge.train.distributed import wrap

    return wrap(LogpStep(model, fast), dist, device)
