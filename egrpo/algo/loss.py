"""The clipped GRPO objective on trained SDE steps (ALGORITHMS.md section 2).

rho = exp(logp_new - logp_old);  L = mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps)))
optional KL to the reference policy: beta * ||mu_theta - mu_ref||^2 / (2 g^2 |delta|), averaged like the log-prob
(`kl_form="egrpo"`: the KL of the two Gaussian transitions), or / (2 g^2) (`"flow_grpo"`: what Flow-GRPO's code
computes, its std_dev_t without the sqrt(|delta|); 1 / |delta| times smaller, 15-28x on SD3's trained steps, so
Flow-GRPO's beta only means the same with this form).

The mean over a minibatch is written as a weighted sum, L = sum_i w_i l_i, so that the rows of one minibatch may
be spread over micro-batches and data-parallel ranks (and padded with rows of weight 0) and still add up to the
exact mean over its real rows (`loss_weights`).
"""

from __future__ import annotations

from typing import Literal

import torch

from egrpo.batch import Batch
from egrpo.sampling.rollout import VelocityModel
from egrpo.sampling.steps import gaussian_logprob, per_sample, sde_mean, sde_std


def loss_weights(minibatch: Batch) -> torch.Tensor:
    """Each row's weight w_i in the loss sum_i w_i l_i: the `loss_weight` column that the data-parallel slicing
    writes (`egrpo.runtime.learner.slice_for_ranks`: world_size / real rows, 0 for padding), else 1 / rows,
    the plain mean."""
    if "loss_weight" in minibatch.tensors:
        return minibatch["loss_weight"]
    return torch.full((len(minibatch),), 1 / len(minibatch))


def input_groups(steps: Batch) -> list[list[int]]:
    """The rows of each distinct input state (the rollout's `input` column), in order of first appearance;
    without that column every row is its own."""
    if "input" not in steps.meta:
        return [[row] for row in range(len(steps))]
    groups: dict[int, list[int]] = {}
    for row, state in enumerate(steps["input"]):
        groups.setdefault(state, []).append(row)
    return list(groups.values())


def step_mean_and_std(policy: VelocityModel, steps: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The policy's SDE transition mean for each trained step (with grad), its std, and the transformer
    forwards that took.

    Rows that leave the same state (one E-GRPO group's G branches; a tree node's children) have the same
    velocity: it is computed once per distinct state and shared (VisualGRPO's trainer does the same), which
    equals the per-row computation up to float rounding, gradients included."""
    device = policy.device
    groups = input_groups(steps)
    firsts = [rows[0] for rows in groups]
    index = torch.empty(len(steps), dtype=torch.long)
    for k, rows in enumerate(groups):
        index[rows] = k
    x_in, sigma = steps["x_in"].to(device), steps["sigma"].to(device)
    sigma_next, g = steps["sigma_next"].to(device), steps["g"].to(device)
    prompts = [steps["prompt"][row] for row in firsts]
    v = policy.velocity(x_in[firsts], sigma[firsts], policy.encode_prompts(prompts))[index.to(device)]
    return sde_mean(x_in, v, sigma, sigma_next, g), sde_std(g, sigma, sigma_next), len(groups)


def grpo_loss(
    mean: torch.Tensor,
    std: torch.Tensor,
    steps: Batch,
    logp_old: torch.Tensor,
    clip_range: float,
    reduction: Literal["mean", "sum"] = "mean",
    mean_ref: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    weights: torch.Tensor | None = None,
    kl_form: Literal["egrpo", "flow_grpo"] = "egrpo",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss over trained steps, sum_i w_i l_i, and its statistics weighted the same way.

    `logp_old` is the log-prob under the weights that produced the rollout, recomputed by the learner so that
    rho == 1 exactly before the first optimiser step. `weights` (one per row) default to 1 / rows, the plain
    mean; rows of weight 0 (padding) add nothing, and `ratio_max_dev` is taken over the rows that count."""
    x_out = steps["x_out"].to(mean.device)
    advantages = steps["advantage"].to(mean.device)
    weights = (loss_weights(steps) if weights is None else weights).to(mean.device, torch.float32)
    logp = gaussian_logprob(x_out, mean, std, reduction)
    ratio = torch.exp(logp - logp_old.to(logp.device))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = (weights * torch.maximum(unclipped, clipped)).sum()
    loss = policy_loss
    counted = weights > 0
    stats = {
        "policy_loss": policy_loss.item(),
        "ratio_mean": (weights * ratio).sum().item(),
        "ratio_max_dev": (ratio[counted] - 1).abs().max().item() if counted.any() else 0.0,
        "clip_fraction": (weights * ((ratio - 1).abs() > clip_range).float()).sum().item(),
    }
    if kl_beta > 0 and mean_ref is not None:
        variance = std**2 if kl_form == "egrpo" else steps["g"].to(mean.device) ** 2
        sq = ((mean.float() - mean_ref.float()) ** 2) / (2 * per_sample(variance, mean))
        dims = tuple(range(1, sq.ndim))
        kl = (weights * (sq.mean(dims) if reduction == "mean" else sq.sum(dims))).sum()
        loss = loss + kl_beta * kl
        stats["kl"] = kl.item()
    return loss, stats
