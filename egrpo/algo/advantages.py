"""Group-normalised advantages (ALGORITHMS.md section 2).

A_i = clip((r_i - mean_G r) / (std_G r + 1e-8), -c, c) within each group G. With several rewards, either each
is normalised within the group and the results are summed with weights (`per_reward`, DanceGRPO style), or the
weighted raw sum is normalised (`weighted_sum`). std is the population std (ddof = 0, our default: a group's
advantages have unit std) or the sample std (ddof = 1, torch.std's default, which DanceGRPO's code uses: advantages smaller by
sqrt((G - 1) / G)). A group whose std is zero up to float
rounding (std <= 1e-6 of its largest |r|) gets A = 0: its rewards are equal, and their float32 mean need not
be, which would otherwise give every member the same +-0.75. A sample with a NaN in any weighted reward is
dropped: it gets advantage 0, is marked invalid (never trained on), and the group is normalised over its
remaining members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

EPS = 1e-8
EQUAL_REWARDS_RTOL = 1e-6  # a group's std below this fraction of its largest |reward| is rounding, not signal


@dataclass(frozen=True)
class Advantages:
    values: torch.Tensor  # (B,) float32; 0 for dropped samples
    valid: torch.Tensor  # (B,) bool; False where a reward was NaN (or the group had < 2 valid members)
    dropped_nan: int  # samples dropped for a NaN reward


def normalise_in_groups(values: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, ddof: int = 0
                        ) -> torch.Tensor:
    """(r - mean_G) / (std_G + eps) over the valid members of each group (std with `ddof`); 0 elsewhere, and 0
    for a group whose rewards are equal up to float rounding."""
    out = torch.zeros_like(values)
    for g in groups.unique():
        members = (groups == g) & valid
        if members.sum() < 2:
            continue
        r = values[members]
        std = r.std(correction=ddof)
        if std <= EQUAL_REWARDS_RTOL * r.abs().max():
            continue
        out[members] = (r - r.mean()) / (std + EPS)
    return out


def group_advantages(
    rewards: dict[str, torch.Tensor],
    groups: list[int] | torch.Tensor,
    weights: dict[str, float],
    combine: Literal["per_reward", "weighted_sum"] = "per_reward",
    clip: float = 5.0,
    ddof: int = 0,
) -> Advantages:
    """Per sample: its rewards normalised within its group (a tree of single-leaf nodes)."""
    return tree_advantages(rewards, [[i] for i in range(len(groups))], groups, weights, combine, clip, ddof)


def tree_advantages(
    rewards: dict[str, torch.Tensor],
    leaves: list[list[int]],
    groups: list[int] | torch.Tensor,
    weights: dict[str, float],
    combine: Literal["per_reward", "weighted_sum"] = "per_reward",
    clip: float = 5.0,
    ddof: int = 0,
) -> Advantages:
    """Per trained edge of a rollout tree (BranchGRPO's rule, ../shared/research/branchgrpo.md 2.2-2.3): the
    value of the node an edge leads to is the mean reward of its leaves (the samples below it, `leaves[e]`),
    and node values are normalised within `groups[e]`, one tree's nodes at one depth. A leaf with a NaN reward
    is left out of every mean (and counted in `dropped_nan`); a node left with no leaves is not trained, nor
    one without another node in its group to be compared with. One leaf per edge is `group_advantages`."""
    missing = [name for name in weights if name not in rewards]
    if missing:
        raise KeyError(f"rewards {missing} are weighted in the config but no reward model returned them")
    stacked = torch.stack([rewards[name].float() for name in weights])  # (R, samples)
    finite = torch.isfinite(stacked).all(0)
    stacked = torch.where(finite, stacked, torch.zeros_like(stacked))
    membership = torch.zeros(len(leaves), stacked.shape[1])
    for e, below in enumerate(leaves):
        membership[e, below] = 1.0
    membership *= finite.float()
    counts = membership.sum(1)
    values = stacked @ membership.T / counts.clamp(min=1)  # (R, edges): node values
    groups = torch.as_tensor(groups)
    valid = counts > 0
    for g in groups.unique():  # a lone survivor has nothing to be compared with
        members = (groups == g) & valid
        if members.sum() < 2:
            valid[members] = False
    w = torch.tensor(list(weights.values()), dtype=torch.float32)
    if combine == "per_reward":
        out = sum(wi * normalise_in_groups(r, groups, valid, ddof) for wi, r in zip(w, values, strict=True))
    else:
        out = normalise_in_groups((w[:, None] * values).sum(0), groups, valid, ddof)
    out = torch.where(valid, out.clamp(-clip, clip), torch.zeros_like(out))
    return Advantages(out, valid, int((~finite).sum()))
