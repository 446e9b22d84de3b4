"""AEGPO's global signal: how much a prompt's attention entropy moved, and rollouts per prompt from it.

ALGORITHMS.md section 3 (`aegpo`, Global):

    dE_i = mean_t |E_theta(t) - E_ref(t)| / E_ref(t)

measured on prompt i's anchor trajectory, with `ref` the base policy. A budget policy turns the dE of one
iteration's prompts into group sizes G_i that always sum to the iteration's total budget B (what uniform
allocation would spend, `prompts x plan.group_size`), each within [g_min, g_max]:

- `uniform`:       G_i = B / P.
- `median_split`:  weight g_high for prompts with dE_i >= median(dE), g_low for the rest, scaled to B.
- `proportional`:  weight dE_i ** alpha, scaled to B.

Scaling to B: find s with sum_i clamp(s w_i, g_min, g_max) = B, then round to integers by largest remainder
within the bounds, so the sum stays exactly B. Equal dE gives equal weights, hence uniform, under every policy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Literal

import torch

BudgetPolicy = Literal["uniform", "median_split", "proportional"]


def relative_entropy_change(entropy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """dE per prompt: rows of (prompts, steps) curves -> (prompts,) mean relative absolute change."""
    return ((entropy - reference).abs() / reference.clamp_min(1e-12)).mean(dim=-1)


def apportion(weights: Sequence[float], total: int, floor: int, ceiling: int) -> list[int]:
    """Integers within [floor, ceiling] summing to `total`, as close as possible to proportional to weights.

    Water-filling on the scale s (bisection: the clamped sum is monotone in s), then largest remainders."""
    count = len(weights)
    if not count * floor <= total <= count * ceiling:
        raise ValueError(f"a budget of {total} cannot give {count} prompts each between {floor} and {ceiling}")
    if sum(weights) <= 0 or len(set(weights)) == 1:
        weights = [1.0] * count

    def clamped(scale: float) -> list[float]:
        return [min(max(scale * w, floor), ceiling) for w in weights]

    low, high = 0.0, ceiling / min(w for w in weights if w > 0)
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(clamped(mid)) < total else (low, mid)
    shares = clamped(high)
    counts = [math.floor(x) for x in shares]
    # hand out what rounding down left, largest remainder first (ties: lower index), never past the ceiling;
    # more than one pass only when zero weights pin prompts at the floor and the others are full
    order = sorted(range(count), key=lambda i: (-(shares[i] - counts[i]), i))
    missing = total - sum(counts)
    while missing > 0:
        for i in order:
            if missing and counts[i] < ceiling:
                counts[i] += 1
                missing -= 1
    return counts


def at_or_above_median(values: list[float]) -> list[bool]:
    """`median_split`'s halves: which values are at or above the median (the mean of the middle two for an
    even count)."""
    return [v >= statistics.median(values) for v in values]


def allocate_rollouts(
    delta_entropy: Sequence[float],
    total: int,
    policy: BudgetPolicy,
    g_min: int,
    g_max: int,
    g_high: int = 16,
    g_low: int = 8,
    alpha: float = 1.0,
) -> list[int]:
    """Group size per prompt from its dE; the sum is always `total` (see the module docstring)."""
    values = [float(d) if math.isfinite(d) else 0.0 for d in delta_entropy]  # an unmeasurable dE counts as 0
    if policy == "uniform":
        weights = [1.0] * len(values)
    elif policy == "median_split":
        weights = [float(g_high if high else g_low) for high in at_or_above_median(values)]
    elif policy == "proportional":
        weights = [max(d, 0.0) ** alpha for d in values]
    else:
        raise ValueError(f"unknown budget policy {policy!r}")
    return apportion(weights, total, g_min, g_max)
