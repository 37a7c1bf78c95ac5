"""The losses of the objectives beyond SFT, on per-sequence (or per-token) log-probabilities.

Every function takes the policy's summed log-probs of each completion's tokens (`logp`, shape (N,)),
their token counts, and, where the objective has one, the reference model's summed log-probs
(`ref`), and returns one loss per example (the caller averages over the step) with the implicit
rewards that the metrics report.

  DPO    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))         Rafailov et al. 2023
  IPO    ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2              Azar et al. 2023
  ORPO   -mean log p(chosen) - beta * log sigmoid(log odds_c - log odds_r), odds = p / (1 - p) over
         the per-token mean log-prob                                     Hong et al. 2024
  SimPO  -log sigmoid(beta * (mean_c - mean_r) - gamma)  (mean = per-token log-prob)   Meng et al. 2024
  KTO    w_d (1 - sigmoid(beta (r - z))) for desirable, w_u (1 - sigmoid(beta (z - r))) for undesirable,
         r = pi - ref, z = max(0, mean r over the micro-batch), detached  Ethayarajh et al. 2024 (z from
         the batch itself rather than from mismatched pairs)
  GRPO   per token -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + kl_beta * KL_k3, averaged over each
         completion's tokens, then over completions; A = group-normalised reward  Shao et al. 2024
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
REFERENCE_FREE = ("orpo", "simpo")


def beta_of(objective: str, beta: float | None) -> float:
    return DEFAULT_BETA.get(objective, 0.1) if beta is None else beta


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
             kind: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward); rewards are beta * (policy - reference)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    loss = (h - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * h)
    return loss, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def orpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, beta: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO on per-token mean log-probs: the chosen side's NLL plus beta times the odds-ratio term."""
    log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
    loss = -mean_c - beta * F.logsigmoid(log_odds)
    return loss, beta * mean_c.detach(), beta * mean_r.detach()


def simpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, beta: float, gamma: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: length-normalised rewards beta * mean log-prob, with a target margin gamma."""
    loss = -F.logsigmoid(beta * (mean_c - mean_r) - gamma)
    return loss, beta * mean_c.detach(), beta * mean_r.detach()


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, beta: float,
             w_desirable: float = 1.0, w_undesirable: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per example, reward beta * (pi - ref)); `desirable` is a bool tensor."""
    r = pi - ref
    z = r.detach().mean().clamp(min=0)
    loss = torch.where(desirable, w_desirable * (1 - torch.sigmoid(beta * (r - z))),
                       w_undesirable * (1 - torch.sigmoid(beta * (z - r))))
    return loss, beta * r.detach()


def pair_loss(objective: str, logp: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None, pcfg
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of B pairs laid out as [chosen_1..B, rejected_1..B] (logp, counts, ref of length 2B)."""
    b = logp.shape[0] // 2
    beta = beta_of(objective, pcfg.beta)
    if objective == "dpo":
        return dpo_loss(logp[:b], logp[b:], ref[:b], ref[b:], beta, pcfg.loss)
    mean = logp / counts.clamp(min=1)
    if objective == "orpo":
        return orpo_loss(mean[:b], mean[b:], beta)
    if objective == "simpo":
        return simpo_loss(mean[:b], mean[b:], beta, pcfg.simpo_gamma)
    raise ValueError(f"not a paired objective: {objective}")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> advantages normalised inside each prompt's group: (r - mean) / (std + eps).
    A group whose completions all score the same gets zero advantage (nothing to learn from it)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, rows: torch.Tensor,
              n_rows: int, clip_eps: float, ref_logp: torch.Tensor | None = None, kl_beta: float = 0.0
              ) -> tuple[torch.Tensor, dict]:
    """GRPO's clipped surrogate. `logp`, `old_logp`, `ref_logp`: per completion token (flattened), `rows`
    the completion each token belongs to, `advantages` per completion. Returns (loss per completion,
    stats: clipped fraction, mean KL)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[rows]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    stats = {"clipped": float(((ratio - 1).abs() > clip_eps).float().mean()) if ratio.numel() else 0.0}
    if ref_logp is not None and kl_beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3: an unbiased, always non-negative estimate of KL(policy || reference)
        per_token = per_token + kl_beta * kl
        stats["kl"] = float(kl.detach().mean()) if kl.numel() else 0.0
    counts = torch.bincount(rows, minlength=n_rows).clamp(min=1)
    per_row = torch.zeros(n_rows, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    return per_row / counts, stats
