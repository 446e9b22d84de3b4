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
    """Per sample: its rewards normalised within its group."""
    stacked, finite = _stack(rewards, weights)
    return _normalised(stacked, finite, torch.as_tensor(groups), weights, combine, clip, ddof,
                       int((~finite).sum()))


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
    is left out of every mean (and counted in `dropped_nan`); a node left with no leaves is not trained. An edge
    with one leaf is a plain sample, so `group_advantages` is the case of one edge per sample."""
    stacked, finite = _stack(rewards, weights)
    membership = torch.zeros(len(leaves), stacked.shape[1])
    for e, below in enumerate(leaves):
        membership[e, below] = 1.0
    membership *= finite.float()
    counts = membership.sum(1)
    node_values = stacked @ membership.T / counts.clamp(min=1)  # (R, edges)
    return _normalised(node_values, counts > 0, torch.as_tensor(groups), weights, combine, clip, ddof,
                       int((~finite).sum()))


def _stack(rewards: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, B) weighted rewards with NaN rows zeroed, and the (B,) mask of samples whose rewards are all finite."""
    missing = [name for name in weights if name not in rewards]
    if missing:
        raise KeyError(f"rewards {missing} are weighted in the config but no reward model returned them")
    stacked = torch.stack([rewards[name].float() for name in weights])
    finite = torch.isfinite(stacked).all(0)
    return torch.where(finite, stacked, torch.zeros_like(stacked)), finite


def _normalised(
    values: torch.Tensor, present: torch.Tensor, groups: torch.Tensor, weights: dict[str, float],
    combine: str, clip: float, ddof: int, dropped_nan: int,
) -> Advantages:
    """Advantages of (R, N) reward values of N rows (samples or tree nodes) within their groups; a row is
    valid when it is `present` and its group has another present row to be compared with."""
    valid = present.clone()
    for g in groups.unique():  # a lone survivor has nothing to be compared with
        members = (groups == g) & present
        if members.sum() < 2:
            valid[members] = False
    w = torch.tensor(list(weights.values()), dtype=torch.float32)
    if combine == "per_reward":
        out = sum(wi * normalise_in_groups(r, groups, valid, ddof) for wi, r in zip(w, values, strict=True))
    else:
        out = normalise_in_groups((w[:, None] * values).sum(0), groups, valid, ddof)
    out = torch.where(valid, out.clamp(-clip, clip), torch.zeros_like(out))
    return Advantages(out, valid, dropped_nan)
