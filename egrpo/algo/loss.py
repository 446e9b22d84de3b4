"""The clipped GRPO objective on trained SDE steps (ALGORITHMS.md section 2).

rho = exp(logp_new - logp_old);  L = mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))
optional KL to the reference policy: beta * ||mu_theta - mu_ref||^2 / (2 g^2 |delta|), averaged like the log-prob.
"""

from __future__ import annotations

from typing import Literal

import torch

from egrpo.batch import Batch
from egrpo.sampling.rollout import VelocityModel
from egrpo.sampling.steps import gaussian_logprob, per_sample, sde_mean


def step_mean_and_std(policy: VelocityModel, steps: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's SDE transition mean for each trained step (with grad), and its std."""
    device = policy.device
    x_in, sigma = steps["x_in"].to(device), steps["sigma"].to(device)
    sigma_next, g = steps["sigma_next"].to(device), steps["g"].to(device)
    v = policy.velocity(x_in, sigma, policy.encode_prompts(steps["prompt"]))
    std = g * (sigma - sigma_next).abs().sqrt()
    return sde_mean(x_in, v, sigma, sigma_next, g), std


def grpo_loss(
    mean: torch.Tensor,
    std: torch.Tensor,
    steps: Batch,
    logp_old: torch.Tensor,
    clip_range: float,
    reduction: Literal["mean", "sum"] = "mean",
    mean_ref: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss over a minibatch of trained steps, and its statistics.

    `logp_old` is the log-prob under the weights that produced the rollout, recomputed by the learner so that
    rho == 1 exactly before the first optimiser step."""
    x_out = steps["x_out"].to(mean.device)
    advantages = steps["advantage"].to(mean.device)
    logp = gaussian_logprob(x_out, mean, std, reduction)
    ratio = torch.exp(logp - logp_old.to(logp.device))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss
    stats = {
        "policy_loss": policy_loss.item(),
        "ratio_mean": ratio.mean().item(),
        "ratio_max_dev": (ratio - 1).abs().max().item(),
        "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item(),
    }
    if kl_beta > 0 and mean_ref is not None:
        sq = ((mean.float() - mean_ref.float()) ** 2) / (2 * per_sample(std, mean) ** 2)
        dims = tuple(range(1, sq.ndim))
        kl = (sq.mean(dims) if reduction == "mean" else sq.sum(dims)).mean()
        loss = loss + kl_beta * kl
        stats["kl"] = kl.item()
    return loss, stats
